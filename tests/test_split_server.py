"""The split server refuses bad input with a clear error and keeps serving everyone else."""

from __future__ import annotations

import copy
import secrets

import grpc
import pytest
import torch

from splitfed import GrpcDataPlane, SplitServerError
from splitfed.protocol import STREAM_METHOD, round_token
from splitfed.wire import Frame, FrameKind, decode_frame, encode_frame
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split, train_through

NODE, OTHER = 5, 6


@pytest.fixture
def served(split_server_factory):
    """A running SFLV1 split server with round 1 open for two nodes; the split it serves."""
    split = small_split()
    server = split_server_factory(copy.deepcopy(split), variant="v1")
    tokens = server.open_round(1, [NODE, OTHER])
    return server, tokens, split


def good_batch(split, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_batches(0, size, batch_size=size)[0]
    with torch.no_grad():
        return split.client_half(images), labels


def assert_other_client_still_served(server, tokens, split, server_round: int = 1) -> None:
    client = split.client_copy()
    stats = train_through(
        server,
        tokens[OTHER],
        node_id=OTHER,
        server_round=server_round,
        split=client,
        batches=digits_batches(0, 32, batch_size=16),
        optimizer=SGD_MOMENTUM.build(client.client_parameters()),
    )
    assert stats.steps == 2 and stats.num_examples == 32


def plane(server, tokens, node_id: int = NODE, **overrides) -> GrpcDataPlane:
    kwargs = {
        "address": server.address,
        "node_id": node_id,
        "server_round": 1,
        "token": tokens.get(node_id, "0" * 64),
    }
    return GrpcDataPlane(**(kwargs | overrides))


BAD_BATCHES = {
    "wrong shape": (
        lambda a, y: (a[:, :2], y),
        "has shape [8, 2, 4, 4]; it must be (batch, 4, 4, 4)",
    ),
    "wrong dtype": (lambda a, y: (a.double(), y), "is float64; it must be float32"),
    "NaN activations": (
        lambda a, y: (a.index_fill(0, torch.tensor([3]), float("nan")), y),
        "activations contain NaN",
    ),
    "infinite activations": (lambda a, y: (a * float("inf"), y), "NaN or infinity"),
    "too few labels": (lambda a, y: (a, y[:5]), "'labels' holds a batch of 5 examples"),
    "label out of range": (lambda a, y: (a, y + 100), "the server half failed on this batch"),
    "empty batch": (lambda a, y: (a[:0], y[:0]), "the batch is empty"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_gets_an_error_reply_and_others_keep_training(case, served):
    server, tokens, split = served
    corrupt, message = BAD_BATCHES[case]
    activations, labels = corrupt(*good_batch(split))
    before = copy.deepcopy(server.trainer.copy_for(NODE).state_dict())
    with (
        plane(server, tokens) as bad,
        pytest.raises(SplitServerError, match="refused step 1") as err,
    ):
        bad.exchange(1, activations, labels)
    assert message in str(err.value)
    # A refused batch changes nothing on the server.
    after = server.trainer.copy_for(NODE).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert server.trainer.steps_by_node[NODE] == 0
    assert_other_client_still_served(server, tokens, split)
    stats = server.close_round()
    assert stats.refused_batches == 1 and stats.batches == 2


def test_a_refused_step_can_be_sent_again_on_the_same_stream(served):
    server, tokens, split = served
    activations, labels = good_batch(split)
    with plane(server, tokens) as stream:
        with pytest.raises(SplitServerError, match="float64"):
            stream.exchange(1, activations.double(), labels)
        reply = stream.exchange(1, activations, labels)
    assert reply.cut_gradient.shape == activations.shape
    assert server.trainer.steps_by_node[NODE] == 1


def test_skipped_step_is_refused(served):
    server, tokens, split = served
    with (
        plane(server, tokens) as stream,
        pytest.raises(SplitServerError, match="expected step 1, got 2"),
    ):
        stream.exchange(2, *good_batch(split))


def next_round(server, tokens: dict[int, str]) -> dict[int, str]:
    """Open round 2; the stream then presents NODE's round-1 credential."""
    tokens.update(server.open_round(2, [NODE, OTHER]))
    return {"server_round": 1}


CREDENTIAL_CASES = {
    "made-up token": (lambda server, tokens: {"token": "f" * 64}, "not valid for this run"),
    "another run's token": (
        lambda server, tokens: {"token": round_token(secrets.token_bytes(32), 1, NODE)},
        "not valid for this run",
    ),
    "another node's token": (
        lambda server, tokens: {"token": tokens[OTHER]},
        "not valid for this run",
    ),
    "last round's token": (
        next_round,
        "not selected for the train of round 1 (now: the train of round 2)",
    ),
}


@pytest.mark.parametrize("case", list(CREDENTIAL_CASES))
def test_stream_without_a_valid_credential_is_refused_and_logged(case, served, caplog):
    server, tokens, split = served
    make_overrides, reason = CREDENTIAL_CASES[case]
    round_one_tokens = dict(tokens)
    overrides = {"token": round_one_tokens[NODE]} | make_overrides(server, tokens)
    with (
        caplog.at_level("WARNING", logger="flwr_splitfed"),
        plane(server, tokens, **overrides) as stream,
        pytest.raises(SplitServerError) as err,
    ):
        stream.exchange(1, *good_batch(split))
    assert "UNAUTHENTICATED" in str(err.value) and reason in str(err.value)
    assert any(
        f"node {NODE}" in record.getMessage() and reason in record.getMessage()
        for record in caplog.records
    )
    current_round = 2 if case == "last round's token" else 1
    assert_other_client_still_served(server, tokens, split, server_round=current_round)
    assert server.close_round().refused_streams == 1


def test_stream_without_credential_metadata_is_refused(served):
    server, tokens, split = served
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_stream(STREAM_METHOD)
    activations, labels = good_batch(split)
    request = encode_frame(
        Frame(FrameKind.FORWARD, 1, tensors={"activations": activations, "labels": labels})
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([request])))
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no valid credential" in err.value.details()
    assert_other_client_still_served(server, tokens, split)


def test_garbage_bytes_get_an_error_frame(served):
    server, tokens, split = served
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_stream(STREAM_METHOD)
    metadata = (
        ("splitfed-node-id", str(NODE)),
        ("splitfed-round", "1"),
        ("splitfed-token", tokens[NODE]),
    )
    replies = list(call(iter([b"\x05\x00\x00\x00{oops"]), metadata=metadata))
    channel.close()
    assert len(replies) == 1
    reply = decode_frame(replies[0])
    assert reply.kind == FrameKind.ERROR and "header is not valid" in reply.scalars["error"]
    assert_other_client_still_served(server, tokens, split)


def test_unreachable_split_server_says_how_to_fix():
    with pytest.raises(SplitServerError, match="split-server-advertised-address"):
        GrpcDataPlane(
            address="127.0.0.1:1", node_id=1, server_round=1, token="x", connect_timeout=0.5
        )


def test_closing_the_round_cuts_an_open_stream_and_its_late_batches_change_nothing(served):
    server, tokens, split = served
    with plane(server, tokens) as stream:
        stream.exchange(1, *good_batch(split))  # the client then stalls, its stream open
        stats = server.close_round()
        after_close = copy.deepcopy(server.trainer.copy_for(NODE).state_dict())
        with pytest.raises(SplitServerError, match="ended the stream at step 2"):
            stream.exchange(2, *good_batch(split))  # it wakes up after the round
    assert stats.batches == 1
    late = server.trainer.copy_for(NODE).state_dict()
    assert all(torch.equal(after_close[k], late[k]) for k in late)
    assert server.trainer.steps_by_node[NODE] == 1


def test_a_second_stream_of_the_same_node_in_a_round_is_refused(served, caplog):
    server, tokens, split = served
    with caplog.at_level("WARNING", logger="flwr_splitfed"), plane(server, tokens) as first:
        first.exchange(1, *good_batch(split))
        with (
            plane(server, tokens) as second,
            pytest.raises(SplitServerError, match="already opened its stream of this round"),
        ):
            second.exchange(1, *good_batch(split))
        first.exchange(2, *good_batch(split))  # the first stream is unaffected
    assert any(f"node {NODE}" in r.getMessage() for r in caplog.records)
    assert server.trainer.steps_by_node[NODE] == 2
