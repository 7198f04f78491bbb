"""Hostile or broken batches: refused with a clear reason, and nothing refused changes anything.

Each case sends a batch the split server must refuse, through a real gRPC stream, and checks
that the server half, its BatchNorm statistics and the optimizer state are bit-identical before
and after, for SFLV1 and SFLV2, plain and label-private; then an honest batch still trains.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from splitfed import (
    GrpcDataPlane,
    SFLV1Trainer,
    SplitServer,
    SplitServerError,
    make_trainer,
    split_model,
)
from splitfed.wire import TensorSpec
from tests.conftest import SGD_MOMENTUM

NODE = 9


def model() -> nn.Sequential:
    """BatchNorm on the server's side of the cut, so that a refused forward pass would show."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 4, 3, padding=1),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            conv2=nn.Conv2d(4, 8, 3, padding=1),
            norm2=nn.BatchNorm2d(8),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            fc1=nn.Linear(8 * 4 * 4, 16),
            relu3=nn.ReLU(),
            fc2=nn.Linear(16, 10),
        )
    )


def the_split(label_private: bool):
    return split_model(
        model(),
        cut="pool",
        server_cut="relu3" if label_private else None,
        sample_input=torch.zeros(2, 1, 8, 8),
    )


@pytest.fixture(params=["v1", "v2"])
def variant(request):
    return request.param


@pytest.fixture
def plain(variant):
    yield from serve(label_private=False, variant=variant)


@pytest.fixture
def label_private(variant):
    yield from serve(label_private=True, variant=variant)


def serve(*, label_private: bool, variant: str, labels: TensorSpec | None = None):
    """A split server with round 1 open and one stream on which an honest batch trained."""
    split = the_split(label_private)
    trainer = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        insecure=True,
        label_private=split.label_private,
        output_shape=split.output_shape,
        labels=labels,
    )
    server.start()
    tokens = server.open_round(1, [NODE])
    plane = connect(server, tokens)
    # One honest batch first, so that the optimizer has momentum to lose.
    honest_step(plane, split, step=1, soft=labels is not None)
    yield server, split, plane
    plane.close()
    server.stop(grace=None)


def connect(server: SplitServer, tokens: dict[int, str]) -> GrpcDataPlane:
    return GrpcDataPlane(address=server.address, node_id=NODE, server_round=1, token=tokens[NODE])


def activations(batch: int = 8) -> torch.Tensor:
    return torch.rand(batch, 4, 4, 4, generator=torch.Generator().manual_seed(batch))


def labels(batch: int = 8) -> torch.Tensor:
    return torch.arange(batch) % 10


def honest_step(plane: GrpcDataPlane, split, *, step: int, soft: bool = False) -> torch.Tensor:
    if split.label_private:
        outputs = plane.forward_server_half(step, activations())
        return plane.backward_server_half(step, torch.ones_like(outputs) * 0.01)
    targets = torch.nn.functional.one_hot(labels(), 10).float() if soft else labels()
    return plane.exchange(step, activations(), targets).cut_gradient


def state(server: SplitServer) -> list[torch.Tensor]:
    """Every tensor the server holds for the round: halves, buffers, optimizer state."""
    trainer = server.trainer
    tensors = list(trainer.server_half.state_dict().values())
    if isinstance(trainer, SFLV1Trainer):
        module, optimizer = trainer._copies[NODE]
        tensors += list(module.state_dict().values())
    else:
        optimizer = trainer.optimizer
    for values in optimizer.state_dict()["state"].values():
        tensors += [v for v in values.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in tensors]


def assert_unchanged(before: list[torch.Tensor], server: SplitServer) -> None:
    after = state(server)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


PLAIN_CASES = {
    # The reproducers: labels of NaN or of the wrong shape (refused from the frame's header, as
    # the server half takes one class index per example), finite but extreme activations (their
    # BatchNorm statistics, loss or gradients would overflow), labels the loss fails on after
    # the forward pass updated BatchNorm.
    "NaN soft labels": (
        lambda: (activations(), torch.full((8, 10), float("nan"))),
        "'labels'.*must be int64",
    ),
    "labels of shape (B, 10)": (
        lambda: (activations(), torch.zeros(8, 10, dtype=torch.long)),
        r"'labels'.*has shape \[8, 10\]; it must be \(batch\)",
    ),
    "activations of 3e38": (
        lambda: (torch.full((8, 4, 4, 4), 3e38), labels()),
        "loss|gradients|non-finite",
    ),
    "activations of 1e30": (
        lambda: (torch.full((8, 4, 4, 4), 1e30), labels()),
        "loss|gradients|non-finite",
    ),
    "out-of-range labels": (lambda: (activations(), labels() + 100), "server half failed"),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_a_refused_batch_leaves_the_server_half_and_optimizer_bit_identical(plain, case):
    server, split, plane = plain
    make, reason = PLAIN_CASES[case]
    before = state(server)
    sent_activations, sent_labels = make()
    with pytest.raises(SplitServerError, match=reason):
        plane.exchange(2, sent_activations, sent_labels)
    assert_unchanged(before, server)
    honest_step(plane, split, step=2)  # the same step again, now a good batch: it trains
    stats = server.close_round()
    assert stats.refused_batches == 1 and stats.batches == 2


LABEL_PRIVATE_CASES = {
    "NaN output gradient": lambda outputs: torch.full_like(outputs, float("nan")),
    "output gradient of 1e30": lambda outputs: torch.full_like(outputs, 1e30),
    "output gradient of the wrong shape": lambda outputs: torch.zeros(3, 3),
}


@pytest.mark.parametrize("case", list(LABEL_PRIVATE_CASES))
def test_a_refused_output_gradient_undoes_the_forward_pass(label_private, case):
    server, split, plane = label_private
    before = state(server)
    outputs = plane.forward_server_half(2, activations())
    with pytest.raises(SplitServerError):
        plane.backward_server_half(2, LABEL_PRIVATE_CASES[case](outputs))
    # The batch was dropped, and the server half (SFLV2: released) takes the next one.
    assert_unchanged(before, server)
    honest_step(plane, split, step=2)
    assert server.close_round().batches == 2


def test_extreme_activations_in_the_label_private_split_are_refused_at_the_forward_pass(
    variant,
):
    split = the_split(True)
    trainer = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        output_shape=split.output_shape,
        insecure=True,
        label_private=True,
    )
    with server:
        tokens = server.open_round(1, [NODE])
        before = state(server)
        with (
            connect(server, tokens) as plane,
            pytest.raises(SplitServerError, match="non-finite|not finite"),
        ):
            plane.forward_server_half(1, torch.full((8, 4, 4, 4), 3e38))
        assert_unchanged(before, server)


def test_a_refused_batch_tells_the_client_why_without_internals(plain):
    server, split, plane = plain
    with pytest.raises(SplitServerError) as refused:
        plane.exchange(2, activations(), labels() + 100)  # torch's loss fails on them
    message = str(refused.value)
    assert "the server half failed on this batch: IndexError" in message
    assert "0x" not in message and "frame #" not in message and len(message) < 500


def test_nan_soft_labels_reach_a_server_that_takes_soft_labels_and_change_nothing(variant):
    # Soft labels (one probability per class) pass the header of a server that takes them; the
    # loss is NaN, and the batch is refused before the optimizer steps.
    soft = TensorSpec(frozenset({torch.float32}), (10,))
    serving = serve(label_private=False, variant=variant, labels=soft)
    server, split, plane = next(serving)
    try:
        before = state(server)
        with pytest.raises(SplitServerError, match="the loss of this batch is nan"):
            plane.exchange(2, activations(), torch.full((8, 10), float("nan")))
        assert_unchanged(before, server)
    finally:
        serving.close()
