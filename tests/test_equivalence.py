"""SplitFed against the math it must reproduce, through the real gRPC split server.

- With one client, SFLV1 and SFLV2 are centralized training of the unsplit model.
- SFLV1 with several clients is FedAvg of the unsplit model.
- SFLV2 applies exactly one server-half update per batch, from every client.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitfed import OptimizerConfig, SFLV1Trainer
from tests.conftest import (
    SGD_MOMENTUM,
    digits_batches,
    small_split,
    train_round_concurrently,
    train_through,
)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for key in expected_state:
        torch.testing.assert_close(actual_state[key], expected_state[key], **TOLERANCE, msg=key)


def train_unsplit(
    client_half: nn.Module,
    server_half: nn.Module,
    batches: list,
    *,
    client_optimizer: OptimizerConfig,
    server_optimizer: OptimizerConfig,
    epochs: int,
) -> None:
    """Centralized training of client_half -> server_half as one model, in place."""
    train_centrally(
        nn.Sequential(client_half, server_half),
        [
            client_optimizer.build(client_half.parameters()),
            server_optimizer.build(server_half.parameters()),
        ],
        batches,
        epochs=epochs,
    )


def train_centrally(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], batches: list, *, epochs: int
) -> None:
    """Cross-entropy training of the whole ``model``, each part stepped by its own optimizer."""
    model.train()
    for _ in range(epochs):
        for images, labels in batches:
            loss = nn.functional.cross_entropy(model(images), labels)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_one_client_equals_centralized_training(variant, split_server_factory):
    split = small_split()
    reference = copy.deepcopy(split)
    # Different optimizers on the two halves: the equivalence holds for any pair.
    server_optimizer = OptimizerConfig(torch.optim.Adam, lr=0.01)
    server = split_server_factory(copy.deepcopy(split), variant=variant, optimizer=server_optimizer)
    batches = digits_batches(0, 100, batch_size=16)  # the last batch has 4 examples
    client_half = split.client_half
    tokens = server.open_round(1, [7])
    stats = train_through(
        server,
        tokens[7],
        node_id=7,
        server_round=1,
        split=split,
        batches=batches,
        optimizer=SGD_MOMENTUM.build(client_half.parameters()),
        local_epochs=3,
    )
    assert stats.steps == 3 * len(batches)
    assert stats.num_examples == 300

    train_unsplit(
        reference.client_half,
        reference.server_half,
        batches,
        client_optimizer=SGD_MOMENTUM,
        server_optimizer=server_optimizer,
        epochs=3,
    )
    trainer = server.trainer
    server_half = trainer.copy_for(7) if isinstance(trainer, SFLV1Trainer) else trainer.server_half
    assert_same_state(client_half, reference.client_half)
    assert_same_state(server_half, reference.server_half)
    # Training moved the weights: the comparison above is not between two untouched models.
    assert not torch.allclose(client_half.conv.weight, split_model_initial_conv_weight())


def split_model_initial_conv_weight() -> torch.Tensor:
    return small_split().client_half.conv.weight.detach()


def weighted_average(modules: list[nn.Module], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    states = [m.state_dict() for m in modules]
    averaged = {}
    for key, value in states[0].items():
        mean = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        averaged[key] = (
            mean.round().to(value.dtype) if not value.is_floating_point() else mean.float()
        )
    return averaged


def test_sflv1_with_three_clients_equals_fedavg_of_the_unsplit_model(split_server_factory):
    split = small_split()
    server = split_server_factory(copy.deepcopy(split), variant="v1")
    node_ids = [11, 22, 33]
    # Unequal partitions, so that FedAvg's weighting by examples matters.
    sizes = {11: 40, 22: 72, 33: 100}
    starts = {11: 0, 22: 40, 33: 112}
    batches = {n: digits_batches(starts[n], sizes[n], batch_size=16) for n in node_ids}
    client_halves, results = train_round_concurrently(server, split, batches, local_epochs=2)
    assert {n: r.num_examples for n, r in results.items()} == {n: 2 * sizes[n] for n in node_ids}
    assert server.close_round().examples_by_node == {n: 2 * sizes[n] for n in node_ids}

    # FedAvg of the unsplit model: each client trains the whole model on its own data.
    reference_clients, reference_servers = [], []
    for n in node_ids:
        local = copy.deepcopy(split)
        train_unsplit(
            local.client_half,
            local.server_half,
            batches[n],
            client_optimizer=SGD_MOMENTUM,
            server_optimizer=SGD_MOMENTUM,
            epochs=2,
        )
        reference_clients.append(local.client_half)
        reference_servers.append(local.server_half)
    weights = [sizes[n] for n in node_ids]

    copies = server.trainer.client_copies(node_ids)
    for n, reference_client, reference_server in zip(
        node_ids, reference_clients, reference_servers, strict=True
    ):
        assert_same_state(client_halves[n], reference_client)
        assert_same_state(copies[n], reference_server)

    merged_client = copy.deepcopy(split.client_half)
    merged_client.load_state_dict(weighted_average([client_halves[n] for n in node_ids], weights))
    expected_client = copy.deepcopy(split.client_half)
    expected_client.load_state_dict(weighted_average(reference_clients, weights))
    assert_same_state(merged_client, expected_client)


def test_sflv2_applies_one_update_per_batch_from_every_client(split_server_factory):
    split = small_split()
    # Adam counts its own steps per parameter: the count is the number of updates applied.
    server = split_server_factory(
        copy.deepcopy(split), variant="v2", optimizer=OptimizerConfig(torch.optim.Adam, lr=0.001)
    )
    node_ids = [1, 2, 3, 4]
    batches = {
        n: digits_batches(50 * i, 16 * (i + 2), batch_size=8) for i, n in enumerate(node_ids)
    }
    train_round_concurrently(server, split, batches)
    trainer = server.trainer
    expected_batches = {n: len(batches[n]) for n in node_ids}
    assert trainer.steps_by_node == expected_batches
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {sum(expected_batches.values())}
    # One shared server half: no per-client copies exist.
    assert trainer.client_copies(node_ids) == {}
    assert server.close_round().batches == sum(expected_batches.values())
