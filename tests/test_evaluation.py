"""Federated evaluation: clients evaluate the merged model on their own data through the split
server in eval mode, and the result is what evaluating the whole model gives. Nothing trains."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from simulation.app.models import digits_cnn
from splitfed import (
    DataPlaneTicket,
    GrpcDataPlane,
    Mode,
    SplitFed,
    SplitServer,
    SplitServerError,
    evaluate_client_half,
    make_trainer,
    split_model,
)
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split

NODE = 4


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def serve(split, *, variant: str) -> SplitServer:
    trainer = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        activation_dtype=split.activation_dtype,
        insecure=True,
        label_private=split.label_private,
        output_shape=split.output_shape,
    )
    server.start()
    return server


def evaluate_message(server: SplitServer, split, server_round: int = 1) -> Message:
    token = server.open_round(server_round, [NODE], mode=Mode.EVALUATE)[NODE]
    ticket = DataPlaneTicket(
        address=str(server.address),
        token=token,
        server_round=server_round,
        mode=Mode.EVALUATE,
        label_private=split.label_private,
    )
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(split.client_state_dict()),
                "config": ConfigRecord(),
                "splitfed": ticket.to_record(),
            }
        ),
        dst_node_id=NODE,
        message_type="evaluate",
    )


def central(model: nn.Module, batches) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy and count of the whole model, in eval mode."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in batches:
            outputs = model(images)
            loss += float(nn.functional.cross_entropy(outputs, labels, reduction="sum"))
            correct += int((outputs.argmax(1) == labels).sum())
            count += len(labels)
    return loss / count, correct / count, count


def state_of(*modules: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def unchanged(before: list[torch.Tensor], *modules: nn.Module) -> bool:
    after = [t for m in modules for t in m.state_dict().values()]
    return len(before) == len(after) and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("label_private", [False, True], ids=["plain", "label-private"])
def test_clients_evaluate_what_the_whole_model_scores_and_nothing_trains(variant, label_private):
    torch.manual_seed(1)
    if label_private:
        split = split_model(
            digits_cnn(batch_norm=True),
            cut="pool",
            server_cut="relu3",
            sample_input=torch.zeros(2, 1, 8, 8),
        )
    else:
        split = small_split()  # BatchNorm in the client half: eval mode must not update it
    batches = digits_batches(0, 100, batch_size=16)
    server = serve(split, variant=variant)
    try:
        server_before = state_of(server.trainer.server_half)
        client = split.client_copy()
        client_before = state_of(*client.client_modules())
        reply = evaluate_client_half(
            evaluate_message(server, split),
            Context(1, NODE, {}, RecordDict(), {}),
            split=client,
            loader=batches,
        )
        stats = server.close_round()
    finally:
        server.stop(grace=None)
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    loss, accuracy, count = central(split.full_model(), batches)
    assert metrics["num-examples"] == count == 100
    assert metrics["eval-loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["eval-accuracy"] == pytest.approx(accuracy)
    assert stats.batches == len(batches) and stats.refused_batches == 0
    # Evaluation moved nothing: server half, its BatchNorm statistics and the client's parts.
    assert unchanged(server_before, server.trainer.server_half)
    assert unchanged(client_before, *client.client_modules())
    assert server.trainer.server_half.training  # back in training mode for the next round


def test_a_training_credential_cannot_open_an_evaluation_stream_nor_the_reverse():
    split = small_split()
    server = serve(split, variant="v1")
    try:
        train_token = server.open_round(1, [NODE])[NODE]
        server.open_round(1, [NODE], mode=Mode.EVALUATE)
        with (
            GrpcDataPlane(
                address=server.address,
                node_id=NODE,
                server_round=1,
                token=train_token,
                mode=Mode.EVALUATE,
            ) as plane,
            pytest.raises(SplitServerError, match="not valid for this run"),
        ):
            plane.evaluate(
                1, torch.zeros(2, *split.activation_shape), torch.zeros(2, dtype=torch.long)
            )
        with (
            GrpcDataPlane(
                address=server.address, node_id=NODE, server_round=1, token=train_token
            ) as plane,
            pytest.raises(SplitServerError, match="not selected for the train of round 1"),
        ):
            plane.exchange(
                1, torch.zeros(2, *split.activation_shape), torch.zeros(2, dtype=torch.long)
            )
        assert server.close_round().refused_streams == 2
    finally:
        server.stop(grace=None)


def test_an_evaluation_stream_refuses_training_frames():
    split = small_split()
    server = serve(split, variant="v2")
    try:
        token = server.open_round(1, [NODE], mode=Mode.EVALUATE)[NODE]
        before = state_of(server.trainer.server_half)
        with (
            GrpcDataPlane(
                address=server.address,
                node_id=NODE,
                server_round=1,
                token=token,
                mode=Mode.EVALUATE,
            ) as plane,
            pytest.raises(SplitServerError, match="frame kind 'forward' is not accepted here"),
        ):
            plane.exchange(
                1, torch.rand(4, *split.activation_shape), torch.zeros(4, dtype=torch.long)
            )
        server.close_round()
        assert unchanged(before, server.trainer.server_half)
    finally:
        server.stop(grace=None)


class Grid:
    """Just enough of Flower's Grid for ``configure_*``: the nodes to sample from."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_fraction_evaluate_zero_sends_no_evaluation_and_opens_no_round():
    split = small_split()
    strategy = SplitFed(split=split, insecure=True, aggregator=FedAvg(fraction_evaluate=0.0))
    arrays = ArrayRecord(split.client_state_dict())
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Grid([1, 2, 3]))) == []
    assert strategy.aggregate_evaluate(1, []) is None


def test_evaluation_metrics_are_aggregated_by_the_aggregators_own_function():
    seen = []

    def aggregate(records, weighting_key):
        seen.append((len(records), weighting_key))
        return MetricRecord({"custom": 1.0})

    split = small_split()
    strategy = SplitFed(
        split=split,
        insecure=True,
        aggregator=FedAvg(
            min_evaluate_nodes=2, min_available_nodes=2, evaluate_metrics_aggr_fn=aggregate
        ),
    )
    strategy.split_server.start()
    try:
        messages = list(
            strategy.configure_evaluate(
                1, ArrayRecord(split.client_state_dict()), ConfigRecord(), Grid([1, 2])
            )
        )
        assert [m.metadata.message_type for m in messages] == ["evaluate", "evaluate"]
        assert all(DataPlaneTicket.from_message(m).mode == Mode.EVALUATE for m in messages)
        replies = [
            Message(
                RecordDict({"metrics": MetricRecord({"num-examples": 3, "eval-loss": 1.0})}),
                reply_to=m,
            )
            for m in messages
        ]
        assert strategy.aggregate_evaluate(1, replies) == MetricRecord({"custom": 1.0})
        assert seen == [(2, "num-examples")]
    finally:
        strategy.split_server.stop(grace=None)
