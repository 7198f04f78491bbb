"""Label privacy that survives aggregation: with client heads kept on the clients, the split
server's process (which also aggregates) never holds a client head.

In the label-private split with shared heads the aggregator receives each client's head; running
it on the server half's outputs labels the private examples (``simulation.audit``'s head-forward
attack). With ``SplitFed(client_heads="local")`` messages, replies and the global arrays carry
the client half only; each client keeps its head in its context and trains it on its own data.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from splitfed import (
    DataPlaneTicket,
    GrpcDataPlane,
    SplitFed,
    run_local_epochs,
    train_client_half,
)
from splitfed.client import STATE_CLIENT_HEAD_KEY, evaluate_client_half
from splitfed.privacy import ClientSecret
from tests.conftest import SGD_MOMENTUM, digits_batches
from tests.test_client import NODE, new_context, task_identity, train_message  # noqa: F401
from tests.test_equivalence import assert_same_state
from tests.test_label_private import train_unsplit_u, u_split


class Grid:
    """Just enough of Flower's Grid for ``configure_*``: the nodes to sample from."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def head_keys() -> set[str]:
    return set(u_split().client_head.state_dict())


def client_parts():
    """A client's parts, built as the app builds them: on the meta device, its own materialised."""
    with torch.device("meta"):
        return u_split().materialize_client()


def tensors_held_by(strategy: SplitFed) -> list[torch.Tensor]:
    """Every tensor the strategy's model copy and trainer hold."""
    held = [t for module in strategy._split.client_modules() for t in module.state_dict().values()]
    held += list(strategy._split.server_half.state_dict().values())
    state = strategy.trainer.state_dict()
    held += list(state["server_half"].values())
    return held


def run_round(strategy, server_round, arrays, contexts, batches):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid([1, 2])))
    replies = [
        train_client_half(
            msg,
            contexts[msg.metadata.dst_node_id],
            split=client_parts(),
            train_loader=batches[msg.metadata.dst_node_id],
            optimizer=SGD_MOMENTUM,
        )
        for msg in messages
    ]
    assert not any(r.has_error() for r in replies), [r.error for r in replies]
    merged, _ = strategy.aggregate_train(server_round, replies)
    return messages, replies, merged


def test_with_local_heads_no_message_reply_or_global_array_holds_a_client_head():
    split = u_split()
    strategy = SplitFed(
        split=split,
        insecure=True,
        client_heads="local",
        aggregator=FedAvg(min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2),
    )
    half_keys = set(split.client_half.state_dict())
    assert set(strategy.client_half_keys) == half_keys and not half_keys & head_keys()
    assert strategy._split.client_head is None  # not even the initial head is kept
    strategy._num_rounds = 2
    contexts = {node: new_context() for node in (1, 2)}
    batches = {1: digits_batches(0, 64, batch_size=16), 2: digits_batches(64, 96, batch_size=16)}
    arrays = ArrayRecord(split.client_half.state_dict())
    heads = {}
    with strategy.split_server:
        for server_round in (1, 2):
            messages, replies, merged = run_round(strategy, server_round, arrays, contexts, batches)
            for record in [m.content["arrays"] for m in messages] + [
                r.content["arrays"] for r in replies
            ]:
                assert set(record) == half_keys
            assert merged is not None and set(merged) == half_keys
            arrays = merged
            heads[server_round] = {
                node: contexts[node]
                .state.array_records[STATE_CLIENT_HEAD_KEY]
                .to_torch_state_dict()
                for node in (1, 2)
            }
        evaluations = [
            evaluate_client_half(
                msg,
                contexts[msg.metadata.dst_node_id],
                split=client_parts(),
                loader=digits_batches(1000, 64, batch_size=16),
            )
            for msg in strategy.configure_evaluate(2, arrays, ConfigRecord(), Grid([1, 2]))
        ]
        strategy.aggregate_evaluate(2, evaluations)
    assert not any(e.has_error() for e in evaluations), [e.error for e in evaluations]
    assert all(e.content["metrics"]["num-examples"] == 64 for e in evaluations)
    # Each head is its client's own (personalised), trained on from round to round.
    assert not torch.equal(heads[2][1]["fc2.weight"], heads[2][2]["fc2.weight"])
    assert not torch.equal(heads[1][1]["fc2.weight"], heads[2][1]["fc2.weight"])
    # Nothing the strategy holds has a head's shape, let alone a client's head.
    head_shape = split.client_head.fc2.weight.shape
    assert not any(t.shape == head_shape for t in tensors_held_by(strategy))
    with pytest.raises(ValueError, match="federated evaluation"):
        strategy.global_model(arrays)


def test_a_shared_head_reaches_the_aggregator_and_is_warned_about(caplog):
    split = u_split()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy = SplitFed(
            split=split,
            insecure=True,
            aggregator=FedAvg(min_train_nodes=2, min_available_nodes=2),
        )
    assert "PRIVACY" in caplog.text and "client_heads='local'" in caplog.text
    strategy._num_rounds = 1
    contexts = {node: new_context() for node in (1, 2)}
    batches = {1: digits_batches(0, 32, batch_size=16), 2: digits_batches(32, 32, batch_size=16)}
    with strategy.split_server:
        _, replies, merged = run_round(
            strategy, 1, ArrayRecord(split.client_state_dict()), contexts, batches
        )
    assert all(head_keys() <= set(r.content["arrays"]) for r in replies)
    assert merged is not None and head_keys() <= set(merged)


def test_local_heads_are_refused_where_they_do_not_apply_and_initial_heads_are_refused():
    from tests.conftest import small_split

    with pytest.raises(ValueError, match="label-private"):
        SplitFed(split=small_split(), insecure=True, client_heads="local")
    with pytest.raises(ValueError, match="'shared' or 'local'"):
        SplitFed(split=u_split(), insecure=True, client_heads="secure")
    strategy = SplitFed(split=u_split(), insecure=True, client_heads="local")
    with pytest.raises(ValueError, match=r"client_half.state_dict\(\)"):
        strategy._check_client_half(ArrayRecord(u_split().client_state_dict()))


def test_a_reply_that_carries_a_head_is_left_out_of_the_merge(caplog):
    split = u_split()
    strategy = SplitFed(
        split=split,
        insecure=True,
        client_heads="local",
        aggregator=FedAvg(min_train_nodes=1, min_available_nodes=2),
        min_completed_clients=1,
    )
    strategy._num_rounds = 1
    contexts = {node: new_context() for node in (1, 2)}
    with strategy.split_server:
        messages = list(
            strategy.configure_train(
                1, ArrayRecord(split.client_half.state_dict()), ConfigRecord(), Grid([1, 2])
            )
        )
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = train_client_half(
                msg,
                contexts[node],
                split=client_parts(),
                train_loader=digits_batches(32 * node, 32, batch_size=16),
                optimizer=SGD_MOMENTUM,
            )
            if node == 2:  # a client that sends its head anyway
                leaked = dict(reply.content["arrays"].to_torch_state_dict())
                leaked.update(
                    contexts[node].state.array_records[STATE_CLIENT_HEAD_KEY].to_torch_state_dict()
                )
                reply.content["arrays"] = ArrayRecord(leaked)
            replies.append(reply)
        with caplog.at_level(logging.ERROR, logger="flwr"):
            merged, _ = strategy.aggregate_train(1, replies)
    assert "left out" in caplog.text
    assert merged is not None and set(merged) == set(split.client_half.state_dict())
    (kept,) = [r for r in replies if r.metadata.src_node_id == 1]
    one = kept.content["arrays"].to_torch_state_dict()
    merged_state = merged.to_torch_state_dict()
    assert all(torch.equal(merged_state[k], one[k]) for k in merged_state)  # client 1's alone


def test_a_client_that_keeps_its_head_ignores_a_head_in_the_message(split_server_factory, caplog):
    split = u_split()
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    context = new_context()
    sent_head = split.client_head.fc2.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="flwr_splitfed"):
        reply = train_client_half(
            _u_message(server, 1, split, with_head=True),
            context,
            split=client_parts(),
            train_loader=digits_batches(0, 32, batch_size=16),
            optimizer=SGD_MOMENTUM,
            keep_client_head=True,
        )
    assert not reply.has_error(), reply.error
    assert not set(reply.content["arrays"]) & head_keys()
    assert "ignores it" in caplog.text
    kept = context.state.array_records[STATE_CLIENT_HEAD_KEY].to_torch_state_dict()
    # The head started from the client's own draw, not from the server's weights.
    assert (kept["fc2.weight"] - sent_head).abs().mean() > 0.01


def test_a_kept_head_is_first_drawn_from_the_clients_secret(split_server_factory):
    split = u_split()

    def first_head(secret: ClientSecret) -> torch.Tensor:
        server = split_server_factory(copy.deepcopy(split), variant="v2")
        context = new_context()
        client = client_parts()
        reply = train_client_half(
            _u_message(server, 1, split, with_head=False),
            context,
            split=client,
            train_loader=[],  # no batch: the head stays as drawn
            optimizer=SGD_MOMENTUM,
            secret=secret,
        )
        assert not reply.has_error(), reply.error
        head = context.state.array_records[STATE_CLIENT_HEAD_KEY].to_torch_state_dict()
        return head["fc2.weight"]

    a, again = (
        first_head(ClientSecret.from_value("f" * 32)),
        first_head(ClientSecret.from_value("f" * 32)),
    )
    b = first_head(ClientSecret.from_value("g" * 32))
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert not torch.equal(a, split.client_head.fc2.weight)  # not the server's initial head
    # Drawn as nn.Linear draws its weights: uniform within 1/sqrt(fan_in).
    assert a.abs().max() <= 64**-0.5 and a.std() > 0.5 * 64**-0.5 / 3**0.5


def test_evaluating_before_a_head_was_trained_says_what_to_do(split_server_factory):
    split = u_split()
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    token = server.open_round(1, [NODE], mode="evaluate")[NODE]
    ticket = DataPlaneTicket(
        address=server.address, token=token, server_round=1, mode="evaluate", label_private=True
    )
    from flwr.app import Message

    msg = Message(
        RecordDict(
            {"arrays": ArrayRecord(split.client_half.state_dict()), "splitfed": ticket.to_record()}
        ),
        dst_node_id=NODE,
        message_type="evaluate",
    )
    reply = evaluate_client_half(
        msg, new_context(), split=client_parts(), loader=digits_batches(0, 16, batch_size=16)
    )
    assert reply.has_error() and "select it for training first" in reply.error.reason


def test_one_client_with_a_kept_head_is_centralized_training(split_server_factory):
    """Two rounds of one client whose head stays in its context equal two epochs of the unsplit
    model: the kept head and the client optimizer's state carry over between rounds."""
    split = u_split()
    reference = copy.deepcopy(split)
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    batches = digits_batches(0, 96, batch_size=16)
    context = new_context()
    context.state[STATE_CLIENT_HEAD_KEY] = ArrayRecord(split.client_head.state_dict())
    half = split.client_half.state_dict()
    for server_round in (1, 2):
        client = client_parts()
        msg = _u_message(server, server_round, split, with_head=False, client_half=half)
        reply = train_client_half(
            msg, context, split=client, train_loader=batches, optimizer=SGD_MOMENTUM
        )
        assert not reply.has_error(), reply.error
        half = reply.content["arrays"].to_torch_state_dict()
        assert set(half) == set(split.client_half.state_dict())
    train_unsplit_u(
        reference, batches, client_optimizer=SGD_MOMENTUM, server_optimizer=SGD_MOMENTUM, epochs=2
    )
    client.client_half.load_state_dict(half)
    assert_same_state(client.client_half, reference.client_half)
    assert_same_state(server.trainer.server_half, reference.server_half)
    kept = context.state.array_records[STATE_CLIENT_HEAD_KEY].to_torch_state_dict()
    client.client_head.load_state_dict(kept)
    assert_same_state(client.client_head, reference.client_head)


def _u_message(server, server_round, split, *, with_head: bool, client_half=None):
    token = server.open_round(server_round, [NODE])[NODE]
    ticket = DataPlaneTicket(
        address=server.address, token=token, server_round=server_round, label_private=True
    )
    state = dict(client_half if client_half is not None else split.client_half.state_dict())
    if with_head:
        state.update(split.client_head.state_dict())
    from flwr.app import Message

    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(state),
                "config": ConfigRecord({"server-round": server_round}),
                "splitfed": ticket.to_record(),
            }
        ),
        dst_node_id=NODE,
        message_type="train",
    )


def test_run_local_epochs_is_unchanged_for_plain_label_private_training(split_server_factory):
    """The kept-head path does not touch the Flower-free loop: one epoch through it still
    matches one epoch of the unsplit model."""
    split = u_split()
    reference = copy.deepcopy(split)
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    batches = digits_batches(0, 48, batch_size=16)
    token = server.open_round(1, [NODE])[NODE]
    with GrpcDataPlane(address=server.address, node_id=NODE, server_round=1, token=token) as plane:
        run_local_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(split.client_parameters()),
        )
    train_unsplit_u(
        reference, batches, client_optimizer=SGD_MOMENTUM, server_optimizer=SGD_MOMENTUM, epochs=1
    )
    assert_same_state(split.client_head, reference.client_head)
