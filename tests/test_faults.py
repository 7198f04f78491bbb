"""Faults under `flwr run` on the simulation engine: a client killed mid-epoch, the server
killed between rounds. (A client that stalls is tested on the deployment engine, in
test_deployment.py: Ray stops delivering the other actors' results while one of its worker
processes is stopped, which no deployment has.)

Every fault is real: the ClientApp's Ray actor process gets SIGKILL while it trains, and the
launcher process itself gets SIGKILL between rounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from simulation.app.config import AppConfig
from simulation.app.server_app import CHECKPOINT_NAME
from simulation.launch.flwr_cli import APP_DIR, format_table
from splitfed.checkpoint import load_checkpoint
from tests.conftest import (
    assert_none_left,
    client_app_actors,
    cpu_seconds,
    marked_environment,
)
from tests.test_simulation import FROM_SEED, unsplit_reference

pytestmark = pytest.mark.slow


def busy_actor(cluster, *, after_cpu_seconds: float, timeout: float = 120.0) -> int:
    """Wait for a ClientApp actor that runs a message and has trained in it for
    ``after_cpu_seconds`` of CPU time; return its pid."""
    deadline = time.monotonic() + timeout
    baseline: dict[int, float] = {}
    while time.monotonic() < deadline:
        for pid in client_app_actors(cluster, running=True):
            used = cpu_seconds(pid)
            baseline.setdefault(pid, used)
            if used - baseline[pid] >= after_cpu_seconds:
                return pid
        time.sleep(0.05)
    raise TimeoutError("no ClientApp actor started training")


def in_background(action) -> tuple[threading.Thread, list]:
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(action()), daemon=True)
    thread.start()
    return thread, outcome


def test_a_client_killed_mid_epoch_is_left_out_and_the_round_completes(launch, ray_cluster):
    overrides = {"num-server-rounds": 2, "local-epochs": 8, "min-train-nodes": 2}

    def kill_one_training_client() -> int:
        pid = busy_actor(ray_cluster, after_cpu_seconds=1.0)
        os.kill(pid, signal.SIGKILL)
        return pid

    killer, killed = in_background(kill_one_training_client)
    result = launch(run_config=overrides, num_supernodes=4)
    killer.join(timeout=5)
    assert killed, "the test did not kill a client"
    assert result.completed, result.failure_report()
    failed = {r: m["failed-clients"] for r, m in result.metrics.items()}
    assert sum(failed.values()) >= 1, result.metrics
    for server_round, metrics in result.metrics.items():
        # Whoever was left, at least min-train-nodes finished, so every round merged.
        assert metrics["clients"] - metrics["failed-clients"] >= 2
        assert metrics["merged"] == 1 and metrics["dropped"] == 0, (server_round, metrics)
    assert "failed and are left out" in result.log
    saved = torch.load(result.output_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(t.float()).all() for t in saved.values())
    assert result.metrics[2]["test-accuracy"] > 0.5


def launcher(output_dir: Path, overrides: dict, ray_address: str) -> list[str]:
    run_config = " ".join(
        f"{k}={chr(34) + v + chr(34) if isinstance(v, str) else v}" for k, v in overrides.items()
    )
    return [
        sys.executable,
        "-m",
        "simulation.launch",
        "--num-supernodes",
        "3",
        "--ray-address",
        ray_address,
        "--output-dir",
        str(output_dir),
        "--run-config",
        run_config,
        "--quiet",
    ]


def checkpoint_round(output_dir: Path) -> int:
    checkpoint = load_checkpoint(output_dir / CHECKPOINT_NAME)
    return 0 if checkpoint is None else int(checkpoint["round"])


def test_a_run_killed_between_rounds_resumes_to_the_uninterrupted_result(
    tmp_path, ray_cluster, launch
):
    # No momentum: the merged model is then reproducible up to float32 summation order, which
    # Flower's reply order changes from run to run (see test_simulation.py). Over three rounds
    # that order moves weights by up to about 1e-4; a resume that lost or repeated a round
    # would move them by a whole round's update, checked below to be far larger.
    overrides = {
        "num-server-rounds": 3,
        "client-momentum": 0.0,
        "server-momentum": 0.0,
        "local-epochs": 1,
        **FROM_SEED,
    }
    config = AppConfig.from_run_config(overrides)
    expected = unsplit_reference(rounds=3, num_partitions=3, config=config)
    one_round_short = unsplit_reference(rounds=2, num_partitions=3, config=config)
    tolerance = 1e-3
    assert max((expected[k] - one_round_short[k]).abs().max() for k in expected) > 10 * tolerance
    interrupted = tmp_path / "interrupted"
    with marked_environment() as marker:
        first = subprocess.Popen(
            launcher(interrupted, overrides, ray_cluster.address),
            cwd=APP_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 300
        while checkpoint_round(interrupted) < 1:
            assert first.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        first.kill()  # the launcher dies; its supervisor takes the SuperLink tree down
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    killed_after = checkpoint_round(interrupted)
    assert 1 <= killed_after < 3, "the run was not interrupted between rounds"
    assert_none_left(marker, "the killed run", wait=60)

    resumed = launch(run_config=overrides, num_supernodes=3, output_dir=interrupted)
    assert resumed.completed, resumed.failure_report()
    assert "resuming after round" in resumed.log
    assert sorted(resumed.metrics) == [1, 2, 3], format_table(resumed.metrics)

    # The uninterrupted result is what the math says an uninterrupted SFLV1 run gives.
    resumed_model = torch.load(resumed.output_dir / "model.pt", weights_only=True)
    assert resumed_model.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed_model[key], value, rtol=0, atol=tolerance, msg=key)
