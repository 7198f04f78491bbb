"""End to end: the app under `flwr run` on Flower's simulation engine (a real SuperLink and Ray).

Each test launches the app as a user does (``python -m simulation.launch``'s ``run_app``) and
checks what it wrote to disk, and that nothing it started is still running afterwards.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from simulation.config import AppConfig
from simulation.launch import run_app
from simulation.task import digits_cnn, partition_loader, round_shuffle_seed

pytestmark = pytest.mark.slow

FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server")


def flower_processes() -> set[int]:
    """PIDs of processes that belong to a Flower simulation (SuperLink, executor, Ray)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in command for name in FLOWER_PROCESSES):
            found.add(int(entry))
    return found


@pytest.fixture
def launch(tmp_path):
    """``run_app`` with an output folder of the test's own; asserts that it leaves no process."""
    before = flower_processes()

    def launch_app(**kwargs):
        return run_app(output_dir=tmp_path / "out", echo=False, timeout=600, **kwargs)

    yield launch_app
    left = flower_processes() - before
    assert not left, f"processes left running after the run: {sorted(left)}"


def fedavg_of_unsplit_model(*, rounds: int, num_partitions: int, config: AppConfig) -> nn.Module:
    """FedAvg of the whole model, each client keeping its optimizer between rounds."""
    torch.manual_seed(config.seed)
    global_model = digits_cnn()
    models = [copy.deepcopy(global_model) for _ in range(num_partitions)]
    optimizers = [config.client_optimizer.build(m.parameters()) for m in models]
    for server_round in range(1, rounds + 1):
        states, weights = [], []
        for partition_id, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            model.load_state_dict(global_model.state_dict())
            loader = partition_loader(
                partition_id=partition_id,
                num_partitions=num_partitions,
                batch_size=config.batch_size,
                shuffle_seed=round_shuffle_seed(config.seed, server_round, partition_id),
            )
            for _ in range(config.local_epochs):
                for images, labels in loader:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(images), labels).backward()
                    optimizer.step()
            states.append(model.state_dict())
            weights.append(len(loader.dataset))
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}
        )
    return global_model


# One round with the app's momentum SGD; two rounds without momentum. Two rounds with momentum are
# not comparable in float32: merely summing the same three client models in another order in
# round 1 moves the round-2 weights by 1e-2 (ReLU and max-pool kinks amplify the last bits).
@pytest.mark.parametrize(("rounds", "momentum"), [(1, 0.9), (2, 0.0)])
def test_sflv1_under_flwr_run_equals_fedavg_of_the_unsplit_model(rounds, momentum, launch):
    overrides = {"num-server-rounds": rounds, "client-momentum": momentum, "server-momentum": momentum}
    config = AppConfig.from_run_config(overrides)
    result = launch(run_config={**overrides, "variant": "v1"}, num_supernodes=3)
    assert result.completed, result.details

    saved = torch.load(result.output_dir / "model.pt", weights_only=True)
    # The halves keep the unsplit model's layer names, so their keys add up to its state dict.
    trained = {**saved["client_half"], **saved["server_half"]}
    expected = fedavg_of_unsplit_model(rounds=rounds, num_partitions=3, config=config).state_dict()
    assert trained.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert set(result.metrics) == set(range(1, rounds + 1))
    assert all(m["data-plane-batches"] > 0 and m["refused-batches"] == 0 for m in result.metrics.values())


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_splitfed_reaches_95_percent_on_held_out_digits(variant, launch):
    result = launch(run_config={"variant": variant}, num_supernodes=10)
    assert result.completed, result.details
    final = result.metrics[max(result.metrics)]
    assert final["test-accuracy"] >= 0.95, result.metrics
    assert final["clients"] == 10 and final["refused-streams"] == 0
    # The data plane carried every batch of every client: 2 epochs of the whole training set.
    batches_per_round = sum(
        2 * len(partition_loader(partition_id=i, num_partitions=10, batch_size=16)) for i in range(10)
    )
    assert all(m["data-plane-batches"] == batches_per_round for m in result.metrics.values())


def test_a_bad_run_config_fails_the_run_with_the_reason(launch):
    result = launch(run_config={"variant": "v3", "num-server-rounds": 1}, num_supernodes=2)
    assert result.status == "finished:failed"
    assert "variant must be one of v1, v2; got 'v3'" in result.details
