"""The split server's limits hold and are counted: streams at once, idle streams, a label-private
batch that waits too long, one stream per node and round, credentials of any characters."""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from splitfed import GrpcDataPlane, SplitServer, SplitServerError, make_trainer, split_model
from splitfed.protocol import METADATA_MODE, METADATA_NODE, METADATA_ROUND, METADATA_TOKEN
from tests.conftest import SGD_MOMENTUM, digits_batches, run_concurrently, small_split
from tests.test_hostile import activations, model


def serving(split, *, variant: str = "v1", **options) -> SplitServer:
    trainer = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        output_shape=split.output_shape,
        label_private=split.label_private,
        insecure=True,
        **options,
    )
    server.start()
    return server


def stream(server: SplitServer, node_id: int, token: str) -> GrpcDataPlane:
    return GrpcDataPlane(address=server.address, node_id=node_id, server_round=1, token=token)


def test_two_hundred_clients_over_a_limit_of_sixty_four_streams_all_finish():
    split = small_split()
    server = serving(split, max_streams=64)
    nodes = list(range(1, 201))
    tokens = server.open_round(1, nodes)
    batch = digits_batches(0, 8, batch_size=8)[0]
    with torch.no_grad():
        sent = split.client_half(batch[0])

    def client(node_id: int) -> int:
        with stream(server, node_id, tokens[node_id]) as plane:
            for step in (1, 2, 3):
                plane.exchange(step, sent, batch[1])
                time.sleep(0.05)  # a client computing its next batch keeps its stream open
        return node_id

    try:
        finished = run_concurrently(*(lambda n=n: client(n) for n in nodes))
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    assert sorted(finished) == nodes
    assert stats.batches == 600 and stats.refused_batches == 0 and stats.refused_streams == 0
    assert stats.busy_refusals > 0  # the limit was reached, answered and counted


def test_idle_streams_are_closed_and_do_not_lock_out_an_honest_client():
    split = small_split()
    server = serving(split, max_streams=4, idle_timeout=1.0)
    tokens = server.open_round(1, list(range(1, 6)))
    idle = [stream(server, n, tokens[n]) for n in range(1, 5)]  # streams that never send
    batch = digits_batches(0, 8, batch_size=8)[0]
    try:
        time.sleep(0.3)  # the idle streams hold every slot
        started = time.monotonic()
        with stream(server, 5, tokens[5]) as honest, torch.no_grad():
            honest.exchange(1, split.client_half(batch[0]), batch[1])
        waited = time.monotonic() - started
        stats = server.close_round()
    finally:
        for plane in idle:
            plane.close()
        server.stop(grace=None)
    assert stats.idle_streams_closed == 4 and stats.batches == 1
    assert stats.busy_refusals > 0 and waited >= 0.5  # it waited for the idle ones to go


def test_an_sflv2_batch_waiting_too_long_for_its_output_gradient_frees_the_half():
    torch.manual_seed(0)
    split = split_model(
        model(), cut="pool", server_cut="relu3", sample_input=torch.zeros(2, 1, 8, 8)
    )
    server = serving(split, variant="v2", hold_timeout=0.5)
    tokens = server.open_round(1, [1, 2])
    before = state_of_v2(server)
    try:
        with stream(server, 1, tokens[1]) as staller, stream(server, 2, tokens[2]) as other:
            staller.forward_server_half(1, activations())  # and then nothing: SFLV2 is held
            started = time.monotonic()
            outputs = other.forward_server_half(1, activations())
            waited = time.monotonic() - started
            other.backward_server_half(1, torch.ones_like(outputs) * 0.01)
            with pytest.raises(SplitServerError, match="no batch waiting"):
                staller.backward_server_half(1, torch.ones_like(outputs))
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    assert waited >= 0.4 and stats.released_holds == 1 and stats.batches == 1
    # Only the other client's batch changed the half: the dropped one left no trace.
    assert not all(torch.equal(a, b) for a, b in zip(before, state_of_v2(server), strict=True))


def state_of_v2(server: SplitServer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in server.trainer.server_half.state_dict().values()]


def test_a_node_opens_one_stream_a_round_even_after_its_first_closed():
    split = small_split()
    server = serving(split)
    tokens = server.open_round(1, [1])
    batch = digits_batches(0, 8, batch_size=8)[0]
    try:
        with torch.no_grad():
            sent = split.client_half(batch[0])
        with stream(server, 1, tokens[1]) as first:
            first.exchange(1, sent, batch[1])
        with (
            stream(server, 1, tokens[1]) as second,
            pytest.raises(SplitServerError, match="already opened its stream of this round"),
        ):
            second.exchange(1, sent, batch[1])  # would restart at step 1 otherwise
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    assert stats.batches == 1 and stats.refused_streams == 1


def test_a_frame_over_the_size_the_server_accepts_is_refused_before_it_arrives():
    split = small_split()
    server = serving(split, max_batch_size=8)
    tokens = server.open_round(1, [1])
    try:
        with (
            stream(server, 1, tokens[1]) as plane,
            pytest.raises(SplitServerError, match="RESOURCE_EXHAUSTED"),
        ):
            plane.exchange(1, torch.rand(4096, *split.activation_shape), torch.zeros(4096).long())
    finally:
        server.stop(grace=None)


class Context:
    """The one piece of gRPC's servicer context the credential check reads, for a credential
    that Python's gRPC client refuses to send (non-ASCII metadata), but a raw HTTP/2 client can."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata, self.code, self.details = metadata, None, None

    def invocation_metadata(self):
        return list(self.metadata.items())

    def abort(self, code, details):
        self.code, self.details = code, details
        raise RuntimeError("aborted")


@pytest.mark.parametrize("token", ["é" * 64, "\udcff" * 64, "x" * 10_000, ""])
def test_a_credential_of_any_characters_is_refused_not_crashed_on(token, caplog):
    split = small_split()
    server = serving(split)
    server.open_round(1, [1])
    context = Context(
        {METADATA_NODE: "1", METADATA_ROUND: "1", METADATA_MODE: "train", METADATA_TOKEN: token}
    )
    try:
        with pytest.raises(RuntimeError, match="aborted"):
            server._authenticate(context)
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for this run" in context.details
    assert stats.refused_streams == 1
    assert token[:8] not in caplog.text or not token  # the credential itself is never logged


def test_refusals_beyond_twenty_a_round_are_counted_not_logged_one_by_one(caplog):
    split = small_split()
    server = serving(split)
    tokens = server.open_round(1, [1])
    caplog.set_level(logging.WARNING, logger="flwr_splitfed")
    try:
        with stream(server, 1, tokens[1]) as plane:
            for _ in range(40):
                with pytest.raises(SplitServerError):
                    plane.exchange(1, torch.zeros(2, 3), torch.zeros(2).long())
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    refusals = [r for r in caplog.records if "refused step" in r.getMessage()]
    assert stats.refused_batches == 40 and len(refusals) == 20
    assert "20 more refusals in round 1" in caplog.text


def test_limits_are_checked_where_they_are_given():
    trainer = make_trainer("v1", server_half=small_split().server_half, optimizer=SGD_MOMENTUM)
    with pytest.raises(ValueError, match="max_streams and max_batch_size must be at least 1"):
        SplitServer(trainer=trainer, activation_shape=(4,), insecure=True, max_batch_size=0)
    with pytest.raises(ValueError, match="needs output_shape"):
        SplitServer(trainer=trainer, activation_shape=(4,), insecure=True, label_private=True)


def test_a_round_closed_right_after_its_clients_closed_their_streams_cuts_none(caplog):
    # A client's close returns once the split server has let its stream go, so the round's
    # end (which comes right after the clients' replies) never takes a finished client for a
    # stalled one.
    split = small_split()
    server = serving(split)
    batch = digits_batches(0, 8, batch_size=8)[0]
    with torch.no_grad():
        sent = split.client_half(batch[0])
    nodes = list(range(1, 9))
    caplog.set_level(logging.WARNING, logger="flwr_splitfed")

    def client(node_id: int, server_round: int, token: str) -> None:
        with GrpcDataPlane(
            address=server.address, node_id=node_id, server_round=server_round, token=token
        ) as plane:
            plane.exchange(1, sent, batch[1])

    try:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for server_round in range(1, 21):
                tokens = server.open_round(server_round, nodes)
                futures = [pool.submit(client, n, server_round, tokens[n]) for n in nodes]
                for future in futures:
                    future.result()
                stats = server.close_round()
                assert stats.batches == len(nodes) and stats.refused_batches == 0
    finally:
        server.stop(grace=None)
    assert "cut the stream" not in caplog.text
