"""A client's batch order and noise come from its own secret, which the server cannot derive.

The server knows the run config, the round, every partition id and every message; before, a
client's batch order was ``round_shuffle_seed(seed, round, partition)`` and the server found it
by trying each partition. Now none of its candidates reproduces the order, while the client's
secret does.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from flwr.app import Context, RecordDict

from simulation.app.client_app import client_secret
from simulation.app.config import AppConfig
from simulation.app.datasets import loader
from simulation.app.task import federated_data, round_shuffle_seed, train_loader
from splitfed import OptimizerConfig, train_client_half
from splitfed.privacy import STATE_SECRET_KEY, ClientSecret, PrivacyConfig
from tests.conftest import digits_batches, small_split
from tests.test_client import NODE, task_identity, train_message  # noqa: F401

PARTITIONS = 4
ROUNDS = 3


def context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=NODE, node_config=node_config or {}, state=RecordDict(), run_config={}
    )


def epoch_orders(loader, epochs: int = 2) -> list[torch.Tensor]:
    """Each local epoch's inputs, in the order the split server receives them."""
    return [torch.cat([batch["image"] for batch in loader]) for _ in range(epochs)]


@pytest.fixture(scope="module")
def app_data():
    config = AppConfig()
    return config, federated_data(config, num_partitions=PARTITIONS)


def server_candidates(config, data, partition: int) -> list[torch.Tensor]:
    """Every order the server can compute from the run config, applied to the client's own
    examples: each round's seed for each partition id it may try (and each local epoch)."""
    candidates = []
    for server_round in range(1, ROUNDS + 1):
        for guess in range(PARTITIONS):
            seed = round_shuffle_seed(config.seed, server_round, guess)
            examples = data.train_partition(partition)
            candidates.extend(
                epoch_orders(loader(examples, batch_size=config.batch_size, shuffle_seed=seed))
            )
    return candidates


def test_the_server_cannot_reproduce_a_clients_batch_order(app_data):
    config, data = app_data
    partition = 2
    secret = client_secret(config, context(), partition_id=partition)
    candidates = server_candidates(config, data, partition)
    for server_round in range(1, ROUNDS + 1):
        private = train_loader(
            config, data, partition_id=partition, server_round=server_round, secret=secret
        )
        derivable = train_loader(config, data, partition_id=partition, server_round=server_round)
        for order, legacy in zip(epoch_orders(private), epoch_orders(derivable), strict=True):
            # The same examples, in an order none of the server's candidates gives.
            assert torch.equal(order.sum(0), legacy.sum(0))
            assert not any(torch.equal(order, c) for c in candidates)
            # The order the server could derive before is among its candidates: the check bites.
            assert any(torch.equal(legacy, c) for c in candidates)


def test_the_same_secret_reproduces_the_order_and_another_changes_it(app_data):
    config, data = app_data

    def orders(secret: ClientSecret) -> list[torch.Tensor]:
        return epoch_orders(
            train_loader(config, data, partition_id=1, server_round=2, secret=secret)
        )

    first, again = (
        orders(ClientSecret.from_value("a" * 32)),
        orders(ClientSecret.from_value("a" * 32)),
    )
    other = orders(ClientSecret.from_value("b" * 32))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Each round, and each epoch of a round, has an order of its own.
    assert not torch.equal(first[0], first[1])


def test_a_secret_comes_from_the_node_config_or_is_created_once_and_kept():
    configured = context({"client-secret": "0123456789abcdef0123"})
    assert (
        ClientSecret.from_context(configured).key
        == ClientSecret.from_value("0123456789abcdef0123").key
    )
    assert STATE_SECRET_KEY not in configured.state.config_records  # nothing to keep
    created = context()
    first = ClientSecret.from_context(created)
    assert STATE_SECRET_KEY in created.state.config_records
    assert ClientSecret.from_context(created).key == first.key  # kept between rounds
    assert ClientSecret.from_context(context()).key != first.key  # another client, another one
    assert "hidden" in repr(first) and first.key.hex() not in repr(first)


def test_a_short_configured_secret_is_used_with_a_loud_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr_splitfed"):
        ClientSecret.from_context(context({"client-secret": "1"}))
    assert "PRIVACY" in caplog.text and "guess" in caplog.text
    with pytest.raises(ValueError, match="16 bytes"):
        ClientSecret(b"short")


def test_streams_of_different_purposes_and_rounds_are_independent():
    secret = ClientSecret.from_value("c" * 32)
    seeds = {secret.seed(p, r) for p in ("shuffle", "noise") for r in (1, 2, 3)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert secret.seed("noise", 1) == ClientSecret.from_value("c" * 32).seed("noise", 1)


def test_from_seed_randomness_is_reproducible_per_partition():
    config = AppConfig.from_run_config({"client-randomness": "from-seed"})
    a = client_secret(config, context(), partition_id=0)
    assert a.key == client_secret(config, context(), partition_id=0).key
    assert a.key != client_secret(config, context(), partition_id=1).key
    private = AppConfig()
    assert private.client_randomness == "private"
    assert client_secret(private, context(), partition_id=0).key != a.key
    with pytest.raises(ValueError, match="client-randomness"):
        AppConfig.from_run_config({"client-randomness": "global"})


def test_noise_follows_the_clients_secret_not_torchs_global_generator(split_server_factory):
    """train_client_half draws the smashed-data noise from the client's secret: the same
    secret trains the same client half, another secret another one, whatever torch's global
    generator holds."""
    split = small_split()
    batches = digits_batches(0, 64, batch_size=16)
    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.5)
    optimizer = OptimizerConfig(torch.optim.SGD, lr=0.05)

    def trained(secret: ClientSecret | None, node_context: Context) -> dict[str, torch.Tensor]:
        server = split_server_factory(copy.deepcopy(split), variant="v2", optimizer=optimizer)
        client = split.client_copy()
        torch.manual_seed(0)  # the same global generator every time
        reply = train_client_half(
            train_message(server, 1, client.client_half),
            node_context,
            split=client,
            train_loader=batches,
            optimizer=optimizer,
            privacy=privacy,
            secret=secret,
        )
        assert not reply.has_error(), reply.error
        return reply.content["arrays"].to_torch_state_dict()

    one = trained(ClientSecret.from_value("d" * 32), context())
    same = trained(ClientSecret.from_value("d" * 32), context())
    other = trained(ClientSecret.from_value("e" * 32), context())
    assert all(torch.equal(one[k], same[k]) for k in one)
    assert not torch.equal(one["conv.weight"], other["conv.weight"])
    # Without a secret given, the node's own (kept in its context) is used and reused.
    node = context()
    first = trained(None, node)
    assert STATE_SECRET_KEY in node.state.config_records
    assert all(torch.equal(first[k], v) for k, v in trained(None, node).items())


def test_a_kept_head_is_drawn_from_the_secret_without_reseeding_any_generator(monkeypatch):
    from torch import nn

    from splitfed.client import _initialise_head

    heads = [nn.Linear(8, 3) for _ in range(3)]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    for head, seed in zip(heads, (11, 11, 12), strict=True):
        _initialise_head(head, seed)
    assert torch.equal(torch.rand(3), expected)  # the CPU generator forked and restored
    assert reseeded == []  # no accelerator generator touched
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert not torch.equal(heads[0].weight, heads[2].weight)
