"""End to end on Flower's deployment engine: a real SuperLink and SuperNodes on loopback, with TLS
and SuperNode authentication, the app run with ``flwr run`` (``simulation.launch.deployment``).

The training test starts and stops a whole deployment through ``run_app`` and checks that
nothing it started is left. The refusal tests share one small deployment (one registered
SuperNode) and try to join it without a registered key and without TLS.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from simulation.launch.deployment import LocalDeployment, make_supernode_keys, run_app
from tests.conftest import (
    app_batches_per_round,
    assert_none_left,
    cpu_seconds,
    marked_environment,
)

pytestmark = pytest.mark.slow

# With 2 clients (half of the training digits each) and private client randomness, SFLV1 is at
# 0.93-0.99 after 3 rounds and 0.97-0.997 after 5 (seeds 0-11, in process); the simulation's test
# takes 10 rounds of 10 clients to 0.95.
ROUNDS = 5
CLIENTS = 2


def test_splitfed_trains_to_95_percent_over_tls_with_authenticated_supernodes(tmp_path):
    with marked_environment() as marker:
        result = run_app(
            run_config={"num-server-rounds": ROUNDS},
            num_supernodes=CLIENTS,
            output_dir=tmp_path / "out",
            work_dir=tmp_path / "work",
            echo=False,
            timeout=600,
        )
    assert_none_left(marker, "the deployment")
    assert result.completed, result.failure_report()

    assert set(result.metrics) == set(range(1, ROUNDS + 1))
    final = result.metrics[ROUNDS]
    assert final["test-accuracy"] >= 0.95, result.metrics
    batches_per_round = app_batches_per_round({}, num_partitions=CLIENTS)
    for server_round, m in result.metrics.items():
        # Both SuperNodes trained, every batch crossed the data plane, and both were merged.
        assert m["clients"] == CLIENTS and m["failed-clients"] == 0, (server_round, m)
        assert m["merged"] == 1 and m["refused-streams"] == 0, (server_round, m)
        assert m["data-plane-batches"] == batches_per_round, (server_round, m)
        # Federated evaluation ran on both SuperNodes, through the split server in eval mode.
        assert 0.0 < m["federated-eval-accuracy"] <= 1.0, (server_round, m)

    # The split server served TLS with the deployment's certificate.
    assert "Data-plane TLS: on" in result.log
    # The SuperLink served HTTPS and admitted exactly the two registered SuperNodes, which
    # each got one train message per round.
    superlink_log = (result.output_dir / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log
    assert superlink_log.count("[ControlServicer.RegisterNode] Created node_id=") == CLIENTS
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id=") == CLIENTS
    for i in range(CLIENTS):
        supernode_log = (result.output_dir / f"supernode-{i}.log").read_text()
        assert supernode_log.count("Receiving: train message") == ROUNDS


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A TLS SuperLink with SuperNode authentication and one registered SuperNode. The SuperNodes
    the tests start join it, so its processes are marked while the tests run."""
    with (
        marked_environment() as marker,
        LocalDeployment(
            num_supernodes=1, work_dir=tmp_path_factory.mktemp("deployment")
        ) as running,
    ):
        yield running
    assert_none_left(marker, "the deployment")


def registration_requests(deployment: LocalDeployment) -> int:
    """Fleet API registration requests the SuperLink has received so far (a SuperNode without a
    key sends one first; the registered SuperNode's polling sends none)."""
    return deployment.log_tail("superlink", lines=100_000).count('"POST /v1/fleet/register-node')


@pytest.mark.parametrize("with_key", [True, False], ids=["unregistered-key", "no-key"])
def test_a_supernode_without_a_registered_key_is_refused(deployment, with_key):
    name = f"stranger-{'key' if with_key else 'nokey'}"
    keys = make_supernode_keys(deployment.work_dir / "keys", name)
    supernode = deployment.start_supernode(
        partition_id=0,
        num_partitions=1,
        private_key=keys.private_key if with_key else None,
        name=name,
        extra_args=("--max-retries", "1"),
    )
    assert supernode.wait(timeout=60) == 1
    log = deployment.log_tail(name)
    assert "Failed to initialize the connection to the SuperLink." in log
    if with_key:
        assert "Failed to activate SuperNode." in log
    else:
        assert "SuperNode authentication is enabled. All SuperNodes must be registered" in log
    # It never became a node that could be sent work; the registered one is still there.
    assert len(deployment.online_supernodes()) == 1
    assert len(deployment.supernodes()) == 1


def test_a_plaintext_supernode_cannot_reach_the_tls_superlink(deployment):
    requests_before = registration_requests(deployment)
    supernode = deployment.start_supernode(
        partition_id=0,
        num_partitions=1,
        insecure=True,
        name="plaintext",
        extra_args=("--max-retries", "1"),
    )
    assert supernode.wait(timeout=60) == 1
    log = deployment.log_tail("plaintext")
    # How the plaintext request dies varies (the TLS server drops it, or resets the connection).
    assert "Failed to initialize the connection to the SuperLink." in log
    # Its registration never got past the TLS handshake to the Fleet API.
    assert registration_requests(deployment) == requests_before
    assert len(deployment.online_supernodes()) == 1


def clientapp_process(deployment: LocalDeployment, supernode: str) -> int | None:
    for pid in deployment.process_ids(supernode):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"flwr-clientapp" in cmdline.read():
                    return pid
        except OSError:
            continue
    return None


def test_a_stalled_client_is_left_out_after_the_round_timeout(tmp_path):
    round_timeout = 60.0  # a round takes 20-37 s here, mostly Flower's 3 s polling
    stalled: list[int] = []

    def stall_supernode_0_while_it_trains(deployment: LocalDeployment) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pid = clientapp_process(deployment, "supernode-0")
            if pid is not None and cpu_seconds(pid) > 3.0:  # past start-up, into training
                os.kill(pid, signal.SIGSTOP)
                stalled.append(pid)
                # It wakes up after the round went on without it; its stream is cut by then.
                time.sleep(round_timeout + 5)
                os.kill(pid, signal.SIGCONT)
                return
            time.sleep(0.1)

    with (
        marked_environment() as marker,
        LocalDeployment(num_supernodes=3, work_dir=tmp_path / "work") as deployment,
    ):
        staller = threading.Thread(target=stall_supernode_0_while_it_trains, args=(deployment,))
        staller.start()
        try:
            result = deployment.run(
                run_config={
                    "num-server-rounds": 1,
                    "round-timeout": round_timeout,
                    "fraction-evaluate": 0.0,
                },
                output_dir=tmp_path / "out",
                echo=False,
                timeout=600,
            )
        finally:
            staller.join()
    assert_none_left(marker, "the deployment")
    assert stalled, "the test did not stall a client"
    assert result.completed, result.failure_report()
    metrics = result.metrics[1]
    splitfed_log = "\n".join(line for line in result.log.splitlines() if "SplitFed" in line)
    assert metrics["clients"] == 3 and metrics["failed-clients"] == 1, splitfed_log
    # round-seconds and Flower's timeout are timed from moments a few milliseconds apart.
    assert metrics["merged"] == 1 and metrics["round-seconds"] >= round_timeout - 0.5
    assert "sent no reply before the round timeout" in splitfed_log
