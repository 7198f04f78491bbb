"""`train_client_half` on real Flower messages and contexts, through a real split server."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from splitfed import DataPlaneTicket, OptimizerConfig, run_local_epochs, train_client_half
from splitfed.client import STATE_OPTIMIZER_KEY
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split
from tests.test_equivalence import assert_same_state

NODE = 3


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; give the test one."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def train_message(server, server_round: int, client_half: nn.Module, **ticket) -> Message:
    token = server.open_round(server_round, [NODE])[NODE]
    record = DataPlaneTicket(
        address=server.address, token=token, server_round=server_round, **ticket
    ).to_record()
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(client_half.state_dict()),
                "config": ConfigRecord({"server-round": server_round}),
                "splitfed": record,
            }
        ),
        dst_node_id=NODE,
        message_type="train",
    )


def new_context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def two_rounds(server, split, batches, *, reset_optimizer: bool) -> nn.Module:
    """Two rounds of one client, each starting from the other round's reply."""
    context, arrays = new_context(), split.client_half.state_dict()
    for server_round in (1, 2):
        client = split.client_copy()
        client_half = client.client_half
        client_half.load_state_dict(arrays)
        reply = train_client_half(
            train_message(server, server_round, client_half),
            context,
            split=client,
            train_loader=batches,
            optimizer=SGD_MOMENTUM,
            reset_optimizer=reset_optimizer,
        )
        arrays = reply.content["arrays"].to_torch_state_dict()
    # The state is kept in context.state only when it is used.
    assert (STATE_OPTIMIZER_KEY in context.state.config_records) is not reset_optimizer
    client_half.load_state_dict(arrays)
    return client_half


def centralized(split, batches, *, rounds: int, fresh_client_optimizer_each_round: bool):
    model = copy.deepcopy(split)
    client_optimizer = SGD_MOMENTUM.build(model.client_half.parameters())
    server_optimizer = SGD_MOMENTUM.build(model.server_half.parameters())
    full = model.full_model().train()
    for _ in range(rounds):
        if fresh_client_optimizer_each_round:
            client_optimizer = SGD_MOMENTUM.build(model.client_half.parameters())
        for images, labels in batches:
            client_optimizer.zero_grad()
            server_optimizer.zero_grad()
            nn.functional.cross_entropy(full(images), labels).backward()
            client_optimizer.step()
            server_optimizer.step()
    return model


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_client_optimizer_state_persists_across_rounds_unless_reset(
    reset_optimizer, split_server_factory
):
    split = small_split()
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    batches = digits_batches(0, 64, batch_size=16)
    trained = two_rounds(server, split, batches, reset_optimizer=reset_optimizer)
    expected = centralized(
        split, batches, rounds=2, fresh_client_optimizer_each_round=reset_optimizer
    )
    assert_same_state(trained, expected.client_half)
    assert_same_state(server.trainer.server_half, expected.server_half)


def test_reply_is_what_flowers_fedavg_accepts(split_server_factory):
    split = small_split()
    server = split_server_factory(copy.deepcopy(split), variant="v1")
    batches = digits_batches(0, 40, batch_size=16)
    reply = train_client_half(
        train_message(server, 1, split.client_half),
        new_context(),
        split=split,
        train_loader=batches,
        optimizer=SGD_MOMENTUM,
        local_epochs=2,
    )
    validate_message_reply_consistency([reply.content], "num-examples", check_arrayrecord=True)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 80 and metrics["steps"] == 6
    assert 0.0 <= metrics["train-accuracy"] <= 1.0 and metrics["train-loss"] > 0
    assert list(reply.content["arrays"]) == list(split.client_half.state_dict())


def test_message_from_another_strategy_is_refused_with_the_fix():
    split = small_split()
    msg = Message(
        RecordDict(
            {"arrays": ArrayRecord(split.client_half.state_dict()), "config": ConfigRecord()}
        ),
        dst_node_id=NODE,
        message_type="train",
    )
    reply = train_client_half(
        msg, new_context(), split=split, train_loader=[], optimizer=SGD_MOMENTUM
    )
    assert reply.has_error()
    assert "not sent by a SplitFed strategy" in reply.error.reason
    assert "Use splitfed.SplitFed in the ServerApp" in reply.error.reason


def test_fedprox_term_pulls_the_client_half_towards_its_start(split_server_factory):
    """Proximal term mu/2 ||w - w_start||^2 on the client half, as FedProx prescribes."""
    mu = 0.5
    split = small_split()
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    batches = digits_batches(0, 48, batch_size=16)
    client = split.client_copy()
    reply = train_client_half(
        train_message(server, 1, client.client_half, proximal_mu=mu),
        new_context(),
        split=client,
        train_loader=batches,
        optimizer=OptimizerConfig(torch.optim.SGD, lr=0.1),
    )
    reference = copy.deepcopy(split)
    start = [p.detach().clone() for p in reference.client_half.parameters()]
    client_optimizer = OptimizerConfig(torch.optim.SGD, lr=0.1).build(
        reference.client_half.parameters()
    )
    server_optimizer = SGD_MOMENTUM.build(reference.server_half.parameters())
    full = reference.full_model().train()
    for images, labels in batches:
        proximal = sum(
            ((p - s) ** 2).sum()
            for p, s in zip(reference.client_half.parameters(), start, strict=True)
        )
        loss = nn.functional.cross_entropy(full(images), labels) + mu / 2 * proximal
        client_optimizer.zero_grad()
        server_optimizer.zero_grad()
        loss.backward()
        client_optimizer.step()
        server_optimizer.step()
    trained = copy.deepcopy(split.client_half)
    trained.load_state_dict(reply.content["arrays"].to_torch_state_dict())
    assert_same_state(trained, reference.client_half)


def test_local_epochs_must_be_positive():
    split = small_split()
    with pytest.raises(ValueError, match="local_epochs must be at least 1"):
        run_local_epochs(
            split=split,
            data_plane=None,
            train_loader=[],
            optimizer=torch.optim.SGD(split.client_half.parameters(), lr=0.1),
            local_epochs=0,
        )


def test_the_ticket_sets_the_data_plane_compression(split_server_factory):
    split = small_split()
    server = split_server_factory(split, variant="v1")
    batches = digits_batches(0, 64, 16)
    sent = {}
    for compression in ("none", "int8-row"):
        train_client_half(
            train_message(server, 1, split.client_half, compression=compression),
            new_context(),
            split=split.client_copy(),
            train_loader=batches,
            optimizer=SGD_MOMENTUM,
        )
        sent[compression] = server.close_round().bytes_received
    assert sent["int8-row"] < sent["none"] * 0.4


def test_a_ticket_without_compression_means_none():
    record = DataPlaneTicket(address="a:1", token="t", server_round=1).to_record()
    del record["compression"]
    message = Message(
        RecordDict({"arrays": ArrayRecord(), "splitfed": record}),
        dst_node_id=NODE,
        message_type="train",
    )
    assert DataPlaneTicket.from_message(message).compression == "none"
