"""Shared test pieces: a small model with buffers, digits batches, running split servers."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from simulation.app.config import AppConfig
from simulation.app.task import federated_data
from simulation.launch.ray_cluster import LocalRayCluster, RayNode
from simulation.launch.simulation_engine import run_app
from splitfed import (
    GrpcDataPlane,
    OptimizerConfig,
    SplitModel,
    SplitServer,
    TrainStats,
    make_trainer,
    run_local_epochs,
    split_model,
)

SGD_MOMENTUM = OptimizerConfig(torch.optim.SGD, lr=0.05, momentum=0.9)


def small_cnn(seed: int = 0) -> nn.Sequential:
    """A model whose client half carries BatchNorm buffers; cut after ``pool``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, kernel_size=3, padding=1),
            norm=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(4 * 4 * 4, 10),
        )
    )


def small_split(seed: int = 0) -> SplitModel:
    return split_model(small_cnn(seed), cut="pool", sample_input=torch.zeros(2, 1, 8, 8))


def digits_batches(
    start: int, count: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training digits from index ``start``, in order, as a list of batches."""
    rows = federated_data(AppConfig()).train_split()[start : start + count]
    images, labels = rows["image"], rows["label"]
    return [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, count, batch_size)
    ]


def start_split_server(
    split: SplitModel, *, variant: str, optimizer: OptimizerConfig = SGD_MOMENTUM
) -> SplitServer:
    trainer = make_trainer(variant, server_half=split.server_half, optimizer=optimizer)
    server = SplitServer.for_split(
        split,
        trainer=trainer,
        insecure=True,  # loopback only
    )
    server.start()
    return server


@pytest.fixture
def split_server_factory() -> Iterator:
    """Start split servers for a test (plain or label-private, as the split is) and stop them
    all afterwards, also when it fails."""
    servers: list[SplitServer] = []

    def factory(split: SplitModel, *, variant: str, optimizer: OptimizerConfig = SGD_MOMENTUM):
        server = start_split_server(split, variant=variant, optimizer=optimizer)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop(grace=None)


def train_through(
    server: SplitServer,
    token: str,
    *,
    node_id: int,
    server_round: int,
    split: SplitModel,
    batches: list,
    optimizer: torch.optim.Optimizer,
    local_epochs: int = 1,
    compression: str = "none",
) -> TrainStats:
    """One client's local training over a real gRPC stream."""
    with GrpcDataPlane(
        address=server.address,
        node_id=node_id,
        server_round=server_round,
        token=token,
        compression=compression,
    ) as plane:
        return run_local_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=optimizer,
            local_epochs=local_epochs,
        )


def train_round_concurrently(
    server: SplitServer,
    split: SplitModel,
    batches_by_node: dict[int, list],
    *,
    local_epochs: int = 1,
    compression: str = "none",
) -> tuple[dict[int, nn.Module], dict[int, TrainStats]]:
    """Open round 1 for the nodes of ``batches_by_node`` and train them all at the same time.

    Each node trains its own copy of the client half with SGD_MOMENTUM over a real gRPC stream.
    """
    tokens = server.open_round(1, list(batches_by_node))
    clients = {n: split.client_copy() for n in batches_by_node}
    client_halves = {n: clients[n].client_half for n in batches_by_node}
    results = run_concurrently(
        *(
            lambda n=n: train_through(
                server,
                tokens[n],
                node_id=n,
                server_round=1,
                split=clients[n],
                batches=batches_by_node[n],
                optimizer=SGD_MOMENTUM.build(clients[n].client_parameters()),
                local_epochs=local_epochs,
                compression=compression,
            )
            for n in batches_by_node
        )
    )
    return client_halves, dict(zip(batches_by_node, results, strict=True))


def run_concurrently(*calls) -> list:
    """Run zero-argument callables on threads at the same time; re-raise the first failure."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call) -> None:
        try:
            results[i] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# -- end to end: Flower processes, a Ray cluster, the launcher ---------------------------------

RUN_MARKER = "SPLITFED_TEST_RUN"


def marked_processes(marker: str) -> set[int]:
    """Live processes whose environment holds ``RUN_MARKER=marker``.

    Every process a launch starts (SuperLink, executor, simulation, Ray) inherits the
    environment, so this finds exactly what one launch left behind, whatever else runs on the
    machine at the same time.
    """
    entry = f"{RUN_MARKER}={marker}".encode()
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.add(int(pid))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def marked_environment() -> Iterator[str]:
    """Mark the processes started inside the block; see :func:`marked_processes`."""
    marker = uuid.uuid4().hex
    previous = os.environ.get(RUN_MARKER)
    os.environ[RUN_MARKER] = marker
    try:
        yield marker
    finally:
        if previous is None:
            del os.environ[RUN_MARKER]
        else:
            os.environ[RUN_MARKER] = previous


def assert_none_left(marker: str, what: str, wait: float = 0.0) -> None:
    deadline = time.monotonic() + wait
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{what} left processes running: {sorted(left)}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and one more node, two CPUs each, made with ``ray start``, shared by the
    end-to-end tests."""
    with marked_environment() as marker:
        cluster = LocalRayCluster([RayNode(num_cpus=2), RayNode(num_cpus=2)])
        cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert_none_left(marker, "the Ray cluster, once stopped,")


@pytest.fixture
def launch(tmp_path, ray_cluster):
    """``run_app`` on the cluster, with an output folder of the test's own; asserts that each
    run leaves no process of its own behind."""
    markers = []

    def launch_app(*, private_ray=False, **kwargs):
        address = None if private_ray else ray_cluster.address
        kwargs.setdefault("output_dir", tmp_path / "out")
        with marked_environment() as marker:
            markers.append(marker)
            return run_app(echo=False, timeout=600, ray_address=address, **kwargs)

    yield launch_app
    for marker in markers:
        assert_none_left(marker, "a run")


def client_app_actors(cluster: LocalRayCluster, *, running: bool = False) -> dict[int, int]:
    """The Ray actor processes that host ClientApps: pid -> index of the cluster node. With
    ``running``, only those executing a message now (Ray titles them ``ClientAppActor.run``)."""
    title = b"ray::ClientAppActor.run" if running else b"ray::ClientAppActor"
    actors = {}
    for index, pids in enumerate(cluster.process_ids_by_node()):
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if cmdline.read().startswith(title):
                        actors[pid] = index
            except OSError:
                continue
    return actors


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def app_batches_per_round(run_config: dict, *, num_partitions: int) -> int:
    """Batches the app's clients send in one round: every local epoch of every partition."""
    from simulation.app.task import train_loader  # noqa: PLC0415

    config = AppConfig.from_run_config(run_config)
    data = federated_data(config, num_partitions=num_partitions)
    return sum(
        config.local_epochs * len(train_loader(config, data, partition_id=i, server_round=1))
        for i in range(num_partitions)
    )
