"""The local-loss variant (Han et al. 2021; CSE-FSL, arXiv 2302.05599).

Each client trains its half on an auxiliary head's loss and streams activations and labels to
the split server without waiting; nothing but acknowledgements comes back. Through the real
split server: the client's parts learn exactly what they learn alone, the server half learns
exactly what it would from the batches the client sent, in the order sent; the bound on batches
in flight holds; wrong pairings are refused with the fix; the auxiliary head travels under its
own keys and is merged; the app learns digits under ``flwr run``.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

import splitfed.server as server_module
from simulation.app.config import AppConfig
from simulation.app.models import digits_cnn
from splitfed import (
    CutError,
    DataPlaneTicket,
    GrpcDataPlane,
    OptimizerConfig,
    PrivacyConfig,
    PrivacyConfigError,
    SplitFed,
    SplitModel,
    SplitServer,
    SplitServerError,
    make_trainer,
    run_local_epochs,
    run_local_loss_epochs,
    split_model,
    train_client_half,
)
from splitfed.cut import AUX_HEAD_PREFIX
from splitfed.dataplane import _ACKNOWLEDGEMENT_LIMITS
from splitfed.wire import Frame, FrameKind, WireFormatError, decode_frame
from tests.conftest import SGD_MOMENTUM, app_batches_per_round, digits_batches, small_split

NODE = 5


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; give the test one."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def aux_split(seed: int = 0) -> SplitModel:
    """The small CNN (BatchNorm in the client half), with the default linear auxiliary head."""
    split = small_split(seed)
    torch.manual_seed(seed + 100)
    return split.with_aux_head(num_classes=10)


@pytest.fixture
def serve():
    """Start split servers for a test (local-loss unless told) and stop them afterwards."""
    servers: list[SplitServer] = []

    def factory(
        server_half: nn.Module,
        split: SplitModel,
        *,
        variant: str = "local-loss",
        server_copies: str | None = "shared",
        optimizer: OptimizerConfig = SGD_MOMENTUM,
    ) -> SplitServer:
        local_loss = variant == "local-loss"
        trainer = make_trainer(
            variant,
            server_copies=server_copies if local_loss else None,
            server_half=server_half,
            optimizer=optimizer,
        )
        server = SplitServer.for_split(
            split,
            trainer=trainer,
            insecure=True,  # loopback only
            local_loss=local_loss,
        )
        server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop(grace=None)


class RecordingPlane(GrpcDataPlane):
    """The gRPC data plane, recording on the client side what it sent and how many batches
    were unacknowledged after each send."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sent: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.in_flight_after_send: list[int] = []

    def send(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> None:
        super().send(step, activations, labels)
        self.sent.append((step, activations.clone(), labels.clone()))
        self.in_flight_after_send.append(self.in_flight)


def stream(
    server: SplitServer,
    split: SplitModel,
    batches: list,
    *,
    send_every: int = 1,
    local_epochs: int = 1,
    max_in_flight: int = 8,
    node_id: int = NODE,
    server_round: int = 1,
):
    """One client's local-loss training over a real gRPC stream; returns its stats and plane."""
    token = server.open_round(server_round, [node_id])[node_id]
    with RecordingPlane(
        address=server.address,
        node_id=node_id,
        server_round=server_round,
        token=token,
        max_in_flight=max_in_flight,
    ) as plane:
        stats = run_local_loss_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(split.client_parameters()),
            local_epochs=local_epochs,
            send_every=send_every,
        )
    return stats, plane


def train_alone(
    split: SplitModel, batches: list, *, local_epochs: int, proximal_mu: float = 0.0
) -> list[torch.Tensor]:
    """The client half and its auxiliary head trained on their own, without any server (with
    FedProx's proximal term for ``proximal_mu > 0``); returns the activations of each batch."""
    assert split.aux_head is not None
    optimizer = SGD_MOMENTUM.build(split.client_parameters())
    start = [p.detach().clone() for p in split.client_parameters()]
    split.client_half.train()
    split.aux_head.train()
    activations = []
    for _ in range(local_epochs):
        for images, labels in batches:
            outputs = split.client_half(images)
            activations.append(outputs.detach().clone())
            loss = nn.functional.cross_entropy(split.aux_head(outputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param, initial in zip(split.client_parameters(), start, strict=True):
                if proximal_mu:
                    param.grad.add_(param.detach() - initial, alpha=proximal_mu)
            optimizer.step()
    return activations


def train_server_half_on(server_half: nn.Module, sent: list) -> None:
    """The server half trained as the split server trains it, on the batches in ``sent``."""
    optimizer = SGD_MOMENTUM.build(server_half.parameters())
    server_half.train()
    for _, activations, labels in sent:
        loss = nn.functional.cross_entropy(server_half(activations), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def assert_equal_states(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not unequal, f"not bit-identical: {unequal}"


# -- 1. the client learns what it learns alone ---------------------------------------------------


@pytest.mark.parametrize("send_every", [1, 3])
def test_the_client_parts_learn_exactly_what_they_learn_alone(send_every, serve):
    split = aux_split()
    reference = split.client_copy()
    frozen = OptimizerConfig(torch.optim.SGD, lr=0.0)
    server = serve(copy.deepcopy(split.server_half), split, optimizer=frozen)
    batches = digits_batches(0, 160, batch_size=16)  # 10 batches, two epochs: 20 steps

    stats, plane = stream(server, split, batches, send_every=send_every, local_epochs=2)
    train_alone(reference, batches, local_epochs=2)

    # Client half (its BatchNorm statistics too) and auxiliary head, bit for bit.
    assert_equal_states(split.client_state_dict(), reference.client_state_dict())
    assert any(key.startswith(AUX_HEAD_PREFIX) for key in split.client_state_dict())
    # The server did train on every k-th batch meanwhile.
    assert stats.steps == 20 and stats.sent_batches == 20 // send_every == len(plane.sent)
    assert server.close_round().batches == 20 // send_every
    assert server.trainer.steps_by_node[NODE] == 20 // send_every


def test_fedprox_and_smashed_data_noise_keep_working(serve):
    split = aux_split()
    reference = split.client_copy()
    server = serve(copy.deepcopy(split.server_half), split)
    batches = digits_batches(0, 96, batch_size=16)
    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.5)
    token = server.open_round(1, [NODE])[NODE]
    with RecordingPlane(address=server.address, node_id=NODE, server_round=1, token=token) as plane:
        run_local_loss_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(split.client_parameters()),
            proximal_mu=0.1,
            privacy=privacy,
            generator=torch.Generator().manual_seed(3),
        )
    clean = train_alone(reference, batches, local_epochs=1, proximal_mu=0.1)

    # The proximal term applies to both client parts; the noise only to what leaves the client.
    assert_equal_states(split.client_state_dict(), reference.client_state_dict())
    generator = torch.Generator().manual_seed(3)
    expected = [privacy.protect_smashed(a, generator=generator) for a in clean]
    assert all(
        torch.equal(sent, noised) for (_, sent, _), noised in zip(plane.sent, expected, strict=True)
    )
    assert not torch.equal(plane.sent[0][1], clean[0])
    # Label protection does not apply: the labels go to the split server.
    with pytest.raises(PrivacyConfigError, match="does not apply to local-loss training"):
        PrivacyConfig(label_noise_multiplier=1.0).validate(local_loss=True)


# -- 2. the server half learns what the client sent ----------------------------------------------


@pytest.mark.parametrize("send_every", [1, 2])
@pytest.mark.parametrize("server_copies", ["shared", "per-client"])
def test_the_server_half_learns_exactly_what_the_client_sent_in_order(
    server_copies, send_every, serve
):
    split = aux_split()
    initial_server_half = copy.deepcopy(split.server_half)
    server = serve(copy.deepcopy(split.server_half), split, server_copies=server_copies)
    batches = digits_batches(0, 128, batch_size=16)  # 8 batches

    stats, plane = stream(server, split, batches, send_every=send_every)
    server.close_round()

    trained = (
        server.trainer.server_half if server_copies == "shared" else server.trainer.copy_for(NODE)
    )
    if server_copies == "per-client":  # the global half waits for the strategy's merge
        assert_equal_states(
            server.trainer.server_half.state_dict(), initial_server_half.state_dict()
        )
    reference = copy.deepcopy(initial_server_half)
    train_server_half_on(reference, plane.sent)
    assert_equal_states(trained.state_dict(), reference.state_dict())

    # With k=2 only every second batch reached the server, numbered 1, 2, 3, ... on the wire.
    assert [step for step, _, _ in plane.sent] == list(range(1, len(batches) // send_every + 1))
    sent_labels = [labels for _, _, labels in plane.sent]
    expected_labels = [labels for _, labels in batches[send_every - 1 :: send_every]]
    assert all(torch.equal(a, b) for a, b in zip(sent_labels, expected_labels, strict=True))
    assert server.trainer.steps_by_node[NODE] == len(batches) // send_every
    assert server.trainer.examples_by_node[NODE] == 128 // send_every
    assert stats.server_examples == 128 // send_every and stats.metrics()["server-loss"] > 0


# -- 3. nothing comes back but acknowledgements --------------------------------------------------


def test_nothing_comes_back_but_acknowledgements(serve, monkeypatch):
    replies: list[Frame] = []
    encode = server_module.encode_frame

    def recording_encode(frame: Frame, **kwargs) -> bytes:
        replies.append(frame)  # the split server encodes nothing but its replies
        return encode(frame, **kwargs)

    monkeypatch.setattr(server_module, "encode_frame", recording_encode)
    split = aux_split()
    server = serve(copy.deepcopy(split.server_half), split)
    batches = digits_batches(0, 160, batch_size=16)

    stats, plane = stream(server, split, batches, local_epochs=2)
    round_stats = server.close_round()

    assert len(replies) == stats.sent_batches == 20
    assert all(frame.kind == FrameKind.ACK and not frame.tensors for frame in replies)
    assert {tuple(frame.scalars) for frame in replies} == {("loss", "correct")}
    # Down: about 90 bytes a batch; up: 16 x 64 activations and 16 labels, about 4.3 KB.
    assert round_stats.bytes_sent < 0.05 * round_stats.bytes_received
    assert plane.bytes_received == round_stats.bytes_sent
    assert plane.bytes_sent == round_stats.bytes_received
    # And the client would refuse an acknowledgement that carried a tensor.
    forged = encode(Frame(FrameKind.ACK, 1, tensors={"gradient": torch.zeros(2, 4)}))
    with pytest.raises(WireFormatError, match="carries no tensor 'gradient'"):
        decode_frame(forged, limits=_ACKNOWLEDGEMENT_LIMITS)


# -- 4. back-pressure ----------------------------------------------------------------------------


class Slow(nn.Module):
    """Identity that takes its time, and notes how far the client had got on each call."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.client_sent_at_call: list[int] = []
        self.plane: RecordingPlane | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.plane is not None
        self.client_sent_at_call.append(len(self.plane.sent))
        time.sleep(self.seconds)
        return x


def test_a_slow_server_holds_the_client_to_its_bound_of_batches_in_flight(serve):
    split = aux_split()
    slow = Slow(0.03)
    server = serve(nn.Sequential(slow, copy.deepcopy(split.server_half)), split)
    batches = digits_batches(0, 160, batch_size=16)  # 10 batches, two epochs
    token = server.open_round(1, [NODE])[NODE]
    with RecordingPlane(
        address=server.address, node_id=NODE, server_round=1, token=token, max_in_flight=2
    ) as plane:
        slow.plane = plane
        stats = run_local_loss_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(split.client_parameters()),
            local_epochs=2,
        )
        assert plane.in_flight == 0  # everything acknowledged before it returned

    # The client's own count: never more than two unacknowledged, and the bound was reached.
    assert max(plane.in_flight_after_send) == 2
    # The server's view: while it trained on batch i, the client had sent at most batch i + 1
    # (it may send i + 1 only once the acknowledgement of i - 1 was in).
    calls = slow.client_sent_at_call
    assert len(calls) == 20
    assert all(sent <= i + 1 for i, sent in enumerate(calls, start=1)), calls
    # Every batch still reached the server.
    assert stats.sent_batches == server.close_round().batches == 20
    assert server.trainer.examples_by_node[NODE] == 320


# -- 5. what is refused --------------------------------------------------------------------------


def u_split() -> SplitModel:
    torch.manual_seed(0)
    return split_model(
        digits_cnn(), cut="pool", server_cut="relu3", sample_input=torch.zeros(2, 1, 8, 8)
    )


def test_local_loss_refuses_the_label_private_split_with_the_fix():
    with pytest.raises(CutError, match="cut the model without server_cut"):
        u_split().with_aux_head(num_classes=10)
    with pytest.raises(ValueError, match="cannot run the label-private split: cut the model"):
        SplitFed(split=u_split(), variant="local-loss", insecure=True)
    split = u_split()
    with pytest.raises(ValueError, match="pass one of label_private and local_loss"):
        SplitServer(
            trainer=make_trainer("v2", server_half=split.server_half, optimizer=SGD_MOMENTUM),
            activation_shape=split.activation_shape,
            output_shape=split.output_shape,
            insecure=True,
            label_private=True,
            local_loss=True,
        )
    with pytest.raises(ValueError, match="label-private=true cannot run with variant='local-loss'"):
        AppConfig.from_run_config({"variant": "local-loss", "label-private": True})


def test_a_strategy_refuses_a_split_that_does_not_fit_its_variant():
    with pytest.raises(ValueError, match=r"pass split=split.with_aux_head\(num_classes=...\)"):
        SplitFed(split=small_split(), variant="local-loss", insecure=True)
    with pytest.raises(ValueError, match="only variant='local-loss' trains"):
        SplitFed(split=aux_split(), variant="v1", insecure=True)
    with pytest.raises(ValueError, match="send_every=2 applies to variant='local-loss' only"):
        SplitFed(split=small_split(), variant="v2", send_every=2, insecure=True)
    with pytest.raises(ValueError, match="server_copies must be one of"):
        SplitFed(split=aux_split(), variant="local-loss", server_copies="some", insecure=True)


def train_message(server: SplitServer, split: SplitModel, **ticket) -> Message:
    token = server.open_round(1, [NODE])[NODE]
    record = DataPlaneTicket(
        address=str(server.address), token=token, server_round=1, **ticket
    ).to_record()
    return Message(
        RecordDict({"arrays": ArrayRecord(split.client_state_dict()), "splitfed": record}),
        dst_node_id=NODE,
        message_type="train",
    )


def new_context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def test_a_variant_mismatch_between_client_and_server_is_refused_with_the_fix(serve):
    batches = digits_batches(0, 32, batch_size=16)
    plain, with_head = small_split(), aux_split()
    v1 = serve(copy.deepcopy(plain.server_half), plain, variant="v1")
    local = serve(copy.deepcopy(with_head.server_half), with_head)

    # The ticket says the variant; a client whose split does not fit it replies with the fix.
    reply = train_client_half(
        train_message(v1, with_head, variant="v1"),
        new_context(),
        split=with_head.client_copy(),
        train_loader=batches,
        optimizer=SGD_MOMENTUM,
    )
    assert reply.has_error() and "only local-loss training uses" in reply.error.reason
    reply = train_client_half(
        train_message(local, plain, variant="local-loss"),
        new_context(),
        split=plain.client_copy(),
        train_loader=batches,
        optimizer=SGD_MOMENTUM,
    )
    assert reply.has_error() and "has no auxiliary head" in reply.error.reason

    # On the data plane, each kind of server refuses the other kind's frames from the header,
    # and nothing changes.
    before = copy.deepcopy(local.trainer.server_half.state_dict())
    token = local.open_round(2, [NODE])[NODE]
    with (
        GrpcDataPlane(address=local.address, node_id=NODE, server_round=2, token=token) as plane,
        pytest.raises(
            SplitServerError, match="frame kind 'forward' is not accepted here.*local-loss"
        ),
    ):
        run_local_epochs(
            split=plain.client_copy(),
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(plain.client_parameters()),
        )
    assert local.close_round().refused_batches == 1
    assert_equal_states(local.trainer.server_half.state_dict(), before)

    before = copy.deepcopy(v1.trainer.server_half.state_dict())
    token = v1.open_round(2, [NODE])[NODE]
    with (
        GrpcDataPlane(address=v1.address, node_id=NODE, server_round=2, token=token) as plane,
        pytest.raises(SplitServerError, match="frame kind 'activations' is not accepted here"),
    ):
        run_local_loss_epochs(
            split=with_head.client_copy(),
            data_plane=plane,
            train_loader=batches,
            optimizer=SGD_MOMENTUM.build(with_head.client_parameters()),
        )
    assert v1.close_round().refused_batches == 1
    assert_equal_states(v1.trainer.server_half.state_dict(), before)


def test_a_refused_batch_changes_nothing_and_a_node_gets_one_stream_a_round(serve):
    split = aux_split()
    server = serve(copy.deepcopy(split.server_half), split, server_copies="shared")
    good = torch.rand(4, *split.activation_shape)
    labels = torch.zeros(4, dtype=torch.long)
    token = server.open_round(1, [NODE])[NODE]
    with GrpcDataPlane(address=server.address, node_id=NODE, server_round=1, token=token) as plane:
        plane.send(1, good, labels)
        before = copy.deepcopy(server.trainer.state_dict())
        plane.send(2, torch.full_like(good, float("nan")), labels)
        with pytest.raises(SplitServerError, match="refused step 2: activations contain NaN"):
            plane.flush()
    with (
        GrpcDataPlane(address=server.address, node_id=NODE, server_round=1, token=token) as again,
        pytest.raises(SplitServerError, match="already opened its stream of this round"),
    ):
        again.send(1, good, labels)
    stats = server.close_round()
    after = server.trainer.state_dict()
    assert_equal_states(after["server_half"], before["server_half"])
    assert after["optimizer"]["state"].keys() == before["optimizer"]["state"].keys()
    for key, state in before["optimizer"]["state"].items():
        assert torch.equal(
            after["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"]
        )
    assert (stats.batches, stats.refused_batches) == (1, 1)


# -- 6. the auxiliary head travels and is merged -------------------------------------------------


class Grid:
    """Just enough of Flower's Grid for ``configure_train``: the nodes to sample from."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def weighted_mean(tensors: list[torch.Tensor], weights: list[int]) -> torch.Tensor:
    total = sum(weights)
    return sum(t.double() * (w / total) for t, w in zip(tensors, weights, strict=True))


def test_the_aux_head_travels_under_its_own_keys_and_is_merged_with_the_client_half():
    split = aux_split()
    half_keys = set(split.client_half.state_dict())
    head_keys = {AUX_HEAD_PREFIX + key for key in split.aux_head.state_dict()}
    assert set(split.client_state_dict()) == half_keys | head_keys
    assert head_keys == {"aux_head.1.weight", "aux_head.1.bias"}
    strategy = SplitFed(
        split=split,
        variant="local-loss",
        server_copies="per-client",
        send_every=2,
        insecure=True,
        aggregator=FedAvg(min_train_nodes=2, min_available_nodes=2),
    )
    arrays = ArrayRecord(split.client_state_dict())
    strategy._num_rounds = 1
    batches = {1: digits_batches(0, 64, batch_size=16), 2: digits_batches(64, 96, batch_size=16)}
    with strategy.split_server:
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid([1, 2])))
        replies = []
        for msg in messages:
            ticket = DataPlaneTicket.from_message(msg)
            assert (ticket.variant, ticket.send_every) == ("local-loss", 2)
            node = msg.metadata.dst_node_id
            context = Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
            )
            with torch.device("meta"):  # a client builds its parts as the app does
                client = aux_split().materialize_client()
            replies.append(
                train_client_half(
                    msg,
                    context,
                    split=client,
                    train_loader=batches[node],
                    optimizer=SGD_MOMENTUM,
                )
            )
        copies = {
            node: copy.deepcopy(module.state_dict())
            for node, module in strategy.trainer.client_copies([1, 2]).items()
        }
        merged, metrics = strategy.aggregate_train(1, replies)

    assert not any(reply.has_error() for reply in replies), [r.error for r in replies]
    states = [reply.content["arrays"].to_torch_state_dict() for reply in replies]
    weights = [int(reply.content["metrics"]["num-examples"]) for reply in replies]
    assert sorted(weights) == [64, 96]
    assert all(set(state) == half_keys | head_keys for state in states)
    assert merged is not None and set(merged) == half_keys | head_keys
    merged_state = merged.to_torch_state_dict()
    for key in head_keys | {"conv.weight"}:
        expected = weighted_mean([state[key] for state in states], weights).float()
        torch.testing.assert_close(merged_state[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    # The per-client server halves were merged as SFLV1's are, weighted by examples sent
    # (every second batch of each client: 32 and 48 examples).
    merged_server_half = strategy.trainer.server_half.state_dict()
    for key, value in merged_server_half.items():
        expected = weighted_mean([copies[1][key], copies[2][key]], [32, 48]).float()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
    assert metrics is not None and {"server-loss", "sent-batches"} <= set(metrics)
    # The whole model leaves the auxiliary head out.
    model_keys = set(strategy.global_model(merged).state_dict())
    assert not any(key.startswith(AUX_HEAD_PREFIX) for key in model_keys)
    assert model_keys == set(split.full_model().state_dict())


@pytest.mark.slow
def test_local_loss_learns_digits_under_flwr_run_with_federated_evaluation(launch):
    overrides = {"variant": "local-loss", "num-server-rounds": 5}
    result = launch(run_config=overrides, num_supernodes=4)
    assert result.completed, result.failure_report()
    final = result.metrics[5]
    assert final["test-accuracy"] > 0.85, result.metrics
    assert final["federated-eval-accuracy"] > 0.85, result.metrics
    batches = app_batches_per_round(overrides, num_partitions=4)
    assert all(
        m["data-plane-batches"] == batches and m["refused-batches"] == 0
        for m in result.metrics.values()
    )
    # The clients report the server half's loss from its acknowledgements.
    assert all(m["train-server-loss"] > 0 for m in result.metrics.values())
