"""SFLV1 with batched steps: the same updates as SFLV1, per client, checks and refusals included."""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitfed.batched as batched_module
from splitfed import OptimizerConfig, SFLV1Trainer, make_trainer
from splitfed.batched import BatchedSFLV1Trainer
from splitfed.server_half import RefusedBatch, StepResult

from .conftest import SGD_MOMENTUM, run_concurrently

ADAM = OptimizerConfig(torch.optim.Adam, lr=1e-3)
RTOL, ATOL = 1e-5, 1e-6  # the documented tolerance of a batched step
SHAPE = (3, 8, 8)  # one example's activations at the cut


def server_half(seed: int = 0, *, batch_norm: bool = False, momentum: float | None = 0.1):
    """A small conv block, then a classifier: LeNet's server half, scaled down."""
    torch.manual_seed(seed)
    # No bias before BatchNorm: its gradient is zero up to rounding, which Adam scales to a
    # step of lr whatever its sign, so two summation orders would move it differently.
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=not batch_norm)
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
    if batch_norm:
        layers["norm"] = nn.BatchNorm2d(4, momentum=momentum)
    layers.update(
        relu=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(4 * 4 * 4, 16),
        relu2=nn.ReLU(),
        fc2=nn.Linear(16, 10),
    )
    return nn.Sequential(layers)


def batches(node: int, count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + node)
    return [
        (
            torch.randn(size, *SHAPE, generator=generator),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def trainers(half: nn.Module, nodes: list[int], optimizer: OptimizerConfig = SGD_MOMENTUM, **kw):
    """A batched trainer and an SFLV1 reference over the same half, both with a round open."""
    common = {"optimizer": optimizer, "max_abs_gradient": kw.pop("max_abs_gradient", 1e10)}
    batched = BatchedSFLV1Trainer(server_half=copy.deepcopy(half), **common, **kw)
    reference = SFLV1Trainer(server_half=copy.deepcopy(half), **common)
    batched.begin_round(nodes)
    reference.begin_round(nodes)
    return batched, reference


def train_concurrently(trainer, batches_by_node) -> dict[int, list[StepResult]]:
    """Every node streams its batches from its own thread, as the split server's streams do."""
    nodes = list(batches_by_node)

    def stream(node: int) -> list[StepResult]:
        return [trainer.step(node, x, y) for x, y in batches_by_node[node]]

    return dict(zip(nodes, run_concurrently(*(lambda n=n: stream(n) for n in nodes)), strict=True))


def train_one_by_one(trainer, batches_by_node) -> dict[int, list[StepResult]]:
    return {n: [trainer.step(n, x, y) for x, y in bs] for n, bs in batches_by_node.items()}


def snapshot(trainer, node: int) -> tuple[dict, dict]:
    module, optimizer = trainer._copies[node]
    return copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict())


def max_difference(a, b) -> float:
    """Largest absolute difference between two nested states, asserting they are close."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((max_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=RTOL, abs=ATOL)
        return abs(a - b)
    assert a == b
    return 0.0


def assert_same_training(batched, reference, got, expected) -> float:
    """Copies, optimizer states, cut gradients, losses and correct counts agree."""
    worst = 0.0
    for node in expected:
        worst = max(worst, max_difference(snapshot(batched, node), snapshot(reference, node)))
        for mine, theirs in zip(got[node], expected[node], strict=True):
            worst = max(worst, max_difference(mine.cut_gradient, theirs.cut_gradient))
            worst = max(worst, max_difference(mine.loss, theirs.loss))
            assert mine.correct == theirs.correct
    return worst


def bit_identical(a, b) -> bool:
    """Whether two nested states hold the same values, bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bit_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bit_identical(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("optimizer", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batch-norm"])
def test_batched_steps_equal_sflv1(optimizer, batch_norm, monkeypatch):
    nodes, steps = [0, 1, 2, 3], 4
    data = {n: batches(n, steps, 8) for n in nodes}
    # A long window and a group as large as the round: every group holds one step of each node.
    batched, reference = trainers(
        server_half(batch_norm=batch_norm), nodes, optimizer, max_wait=5.0
    )
    vmapped = []
    real_vmap = batched_module.vmap

    def counting_vmap(*args, **kwargs):
        vmapped.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(batched_module, "vmap", counting_vmap)
    got = train_concurrently(batched, data)
    expected = train_one_by_one(reference, data)

    assert len(vmapped) == steps == batched.batched_calls
    assert (batched.batched_steps, batched.unbatched_steps) == (len(nodes) * steps, 0)
    assert batched.batching_off is None
    assert assert_same_training(batched, reference, got, expected) < 1e-5
    assert batched.steps_by_node == reference.steps_by_node
    if batch_norm:  # the running statistics moved, each copy by its own batches
        means = [batched.copy_for(n).norm.running_mean for n in nodes]
        assert not torch.equal(means[0], means[1])
        assert all(int(batched.copy_for(n).norm.num_batches_tracked) == steps for n in nodes)


def test_a_refused_batch_leaves_its_client_bit_identical_while_the_group_steps():
    nodes = [0, 1, 2, 3, 4]
    half = server_half(batch_norm=True)
    batched, reference = trainers(half, nodes, max_wait=5.0, max_abs_gradient=1e3)
    warm = {n: batches(n, 1, 8) for n in nodes}  # optimizer states that are not empty
    train_concurrently(batched, warm)
    train_one_by_one(reference, warm)
    with torch.no_grad():  # node 2's copy now gives gradients beyond max_abs_gradient
        for trainer in (batched, reference):
            trainer.copy_for(2).fc2.weight.mul_(1e6)
    before = {n: snapshot(batched, n) for n in nodes}

    x, y = batches(9, 1, 8)[0]
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")

    def refuse(result: StepResult) -> None:
        raise RuntimeError("the reply cannot be encoded")

    # Node 0 and 4 step; 1 is refused by its before_step, 2 by max_abs_gradient, 3 by its
    # non-finite loss and statistics.
    inputs = {0: x, 1: x, 2: x, 3: nan, 4: x + 1.0}
    hooks = {1: {"before_step": refuse}}
    # SFLV1 marks the tensor it is given as requiring grad: each call gets its own.
    calls = {
        n: lambda n=n: batched.step(n, inputs[n].clone(), y, **hooks.get(n, {})) for n in nodes
    }
    outcomes: dict[int, object] = {}

    def call(node: int) -> None:
        try:
            outcomes[node] = calls[node]()
        except Exception as err:  # noqa: BLE001 - each node's outcome is checked below
            outcomes[node] = err

    run_concurrently(*(lambda n=n: call(n) for n in nodes))
    assert batched.batched_calls == 2  # the warm-up group and this one
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[2], RefusedBatch) and "max_abs_gradient" in str(outcomes[2])
    assert isinstance(outcomes[3], RefusedBatch) and "non-finite" in str(outcomes[3])
    for node in (1, 2, 3):
        assert bit_identical(snapshot(batched, node), before[node])
        assert batched.steps_by_node[node] == 1
        assert all(p.grad is None for p in batched.copy_for(node).parameters())
    # The others stepped, as SFLV1 steps them.
    expected = {n: [reference.step(n, inputs[n].clone(), y)] for n in (0, 4)}
    got = {n: [outcomes[n]] for n in expected}
    assert assert_same_training(batched, reference, got, expected) < 1e-5
    for node in (0, 4):
        assert not bit_identical(snapshot(batched, node), before[node])
    # The refusals are the ones SFLV1 gives.
    for node in (1, 2, 3):
        with pytest.raises(type(outcomes[node]), match=re.escape(str(outcomes[node]))):
            reference.step(node, inputs[node].clone(), y, **hooks.get(node, {}))


def test_batches_of_different_sizes_group_by_size():
    sizes = {0: 8, 1: 8, 2: 5, 3: 5, 4: 3}
    data = {n: batches(n, 2 if n < 4 else 1, size) for n, size in sizes.items()}
    # Groups of two: the two pairs form one group each per step; the lone size runs alone.
    batched, reference = trainers(server_half(), list(sizes), max_wait=1.0, max_group=2)
    got = train_concurrently(batched, data)
    expected = train_one_by_one(reference, data)
    assert (batched.batched_calls, batched.batched_steps, batched.unbatched_steps) == (4, 8, 1)
    assert assert_same_training(batched, reference, got, expected) < 1e-5


def test_a_lone_client_steps_unbatched_without_waiting():
    data = {7: batches(7, 2, 8)}
    batched, reference = trainers(server_half(), [7], max_wait=60.0)
    got = train_concurrently(batched, data)  # would take minutes if it waited for a group
    expected = train_one_by_one(reference, data)
    assert (batched.batched_calls, batched.unbatched_steps) == (0, 2)
    assert assert_same_training(batched, reference, got, expected) == 0.0


def test_batch_norm_with_a_cumulative_average_falls_back_to_unbatched(caplog):
    # momentum=None reads the batch count as a number: no vectorised pass can.
    nodes = [0, 1, 2]
    data = {n: batches(n, 3, 8) for n in nodes}
    batched, reference = trainers(server_half(batch_norm=True, momentum=None), nodes, max_wait=5.0)
    with caplog.at_level(logging.WARNING, logger="flwr_splitfed"):
        got = train_concurrently(batched, data)
    expected = train_one_by_one(reference, data)
    assert batched.batching_off is not None
    assert (batched.batched_calls, batched.unbatched_steps) == (0, 9)
    assert "no longer batched" in caplog.text
    assert assert_same_training(batched, reference, got, expected) == 0.0


def test_a_group_whose_every_step_is_refused_keeps_batching_on():
    # A failed batched pass whose steps also fail alone is the batches' fault, not the model's.
    nodes = [0, 1]
    batched, _ = trainers(server_half(), nodes, max_wait=5.0)
    x = torch.randn(4, *SHAPE)
    out_of_range = torch.full((4,), 99)
    errors: list[BaseException] = []

    def step(node: int) -> None:
        try:
            batched.step(node, x, out_of_range)
        except Exception as err:  # noqa: BLE001 - checked below
            errors.append(err)

    threads = [threading.Thread(target=step, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 2 and batched.batching_off is None
    assert batched.steps_by_node == {0: 0, 1: 0}
    # The next group batches again.
    data = {n: batches(n, 1, 4) for n in nodes}
    train_concurrently(batched, data)
    assert batched.batched_calls == 1


def test_local_loss_steps_without_a_cut_gradient_batch_too():
    nodes = [0, 1, 2]
    data = {n: batches(n, 2, 8) for n in nodes}
    batched, reference = trainers(server_half(), nodes, max_wait=5.0)

    def stream(trainer, node):
        return [trainer.step(node, x, y, cut_gradient=False) for x, y in data[node]]

    got = dict(
        zip(nodes, run_concurrently(*(lambda n=n: stream(batched, n) for n in nodes)), strict=True)
    )
    expected = {n: stream(reference, n) for n in nodes}
    assert batched.batched_calls == 2
    assert all(r.cut_gradient.shape == (0,) for rs in got.values() for r in rs)
    assert assert_same_training(batched, reference, got, expected) < 1e-5


@pytest.mark.parametrize(
    "arguments", [{"max_wait": -1.0}, {"max_wait": float("nan")}, {"max_group": 0}]
)
def test_bad_grouping_options_are_refused(arguments):
    with pytest.raises(ValueError, match="max_"):
        BatchedSFLV1Trainer(server_half=server_half(), optimizer=SGD_MOMENTUM, **arguments)


def test_make_trainer_batches_only_where_there_is_a_copy_per_client():
    kwargs = {"server_half": nn.Linear(4, 3), "optimizer": OptimizerConfig()}
    trainer = make_trainer("v1", batched=True, batch_window=0.005, **kwargs)
    assert isinstance(trainer, BatchedSFLV1Trainer) and trainer.max_wait == 0.005
    per_client = make_trainer("local-loss", server_copies="per-client", batched=True, **kwargs)
    assert isinstance(per_client, BatchedSFLV1Trainer)
    assert type(make_trainer("v1", **kwargs)) is SFLV1Trainer
    for variant, copies in (("v2", None), ("local-loss", "shared"), ("local-loss", None)):
        with pytest.raises(ValueError, match="one shared half in arrival order"):
            make_trainer(variant, server_copies=copies, batched=True, **kwargs)
