"""How the split server updates the server half: SFLV1 and SFLV2.

A trainer takes one batch of cut-layer activations and labels at a time, runs the server half
forward and backward, checks the result, steps the server-half optimizer, and returns the
gradient at the cut (local-loss training asks for none, and none is computed). The local-loss
variant trains with either rule: one copy per client (SFLV1's) or one shared half (SFLV2's).
Every check of a batch happens before the optimizer steps: a batch that is refused (its loss or
gradients are not finite, or are beyond ``max_abs_gradient``; the server half or the loss fails
on it) leaves the server half, its buffers and the optimizer state exactly as they were.
"""

from __future__ import annotations

import copy
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import OptimizerConfig, ServerCopies, Variant

__all__ = [
    "LossFn",
    "RefusedBatch",
    "SFLV1Trainer",
    "SFLV2Trainer",
    "ServerHalfTrainer",
    "StepResult",
    "make_trainer",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RefusedBatch(ValueError):
    """A batch the server half cannot learn from; nothing was changed by it."""


@dataclass
class StepResult:
    """What one server-half step returns to the client."""

    cut_gradient: torch.Tensor
    """The gradient at the cut; empty when the step computed none (local-loss training)."""
    loss: float
    correct: int


BeforeStep = Callable[[StepResult], None]
"""Called with a batch's result once every check passed, just before the optimizer steps; if it
raises, the batch is refused and nothing changes (the split server encodes its reply here)."""


@dataclass
class _Pending:
    """A label-private batch between its two exchanges."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    leaf: torch.Tensor
    outputs: torch.Tensor
    buffers: list[torch.Tensor]
    started: float


class ServerHalfTrainer(ABC):
    """Runs the server half for every batch the split server receives.

    Parameters
    ----------
    server_half : nn.Module
        The global server half. The trainer owns it from here on and updates it in place.
    optimizer : OptimizerConfig
        The server-half optimizer.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        Loss of the server half's output against the labels; must average over the batch, like
        the unsplit model's training would. ``None`` means ``nn.CrossEntropyLoss()``.
    device : str | torch.device (default: "cpu")
        Where the server half runs. Activations arrive on the CPU and are moved there.
    max_abs_gradient : float (default: 1e10)
        A batch whose gradients (of the server half's parameters, or at the cut) exceed this in
        magnitude is refused before the optimizer steps: such a step would make the half, or an
        optimizer's squared-gradient state, overflow. Healthy training stays far below it.
    """

    variant: str

    def __init__(
        self,
        *,
        server_half: nn.Module,
        optimizer: OptimizerConfig,
        loss_fn: LossFn | None = None,
        device: str | torch.device = "cpu",
        max_abs_gradient: float = 1e10,
    ) -> None:
        if not max_abs_gradient > 0:
            raise ValueError(f"max_abs_gradient must be positive; got {max_abs_gradient}")
        self.device = torch.device(device)
        self.server_half = server_half.to(self.device).train()
        self.optimizer_config = optimizer
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.max_abs_gradient = max_abs_gradient
        self._counts_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self.steps_by_node: dict[int, int] = {}
        self.examples_by_node: dict[int, int] = {}

    def begin_round(self, node_ids: list[int]) -> None:
        """Prepare for a round in which ``node_ids`` stream batches."""
        with self._counts_lock:
            self.steps_by_node = {node_id: 0 for node_id in node_ids}
            self.examples_by_node = {node_id: 0 for node_id in node_ids}

    def step(
        self,
        node_id: int,
        activations: torch.Tensor,
        labels: torch.Tensor,
        *,
        before_step: BeforeStep | None = None,
        cut_gradient: bool = True,
    ) -> StepResult:
        """Train the server half on one batch from ``node_id``; return the gradient at the cut.

        Raises :class:`RefusedBatch` (and changes nothing) if the batch cannot be learned from.
        ``before_step`` runs once the batch passed every check, before the optimizer steps.
        With ``cut_gradient=False`` (local-loss training) the gradient at the cut is neither
        computed nor returned: the result's ``cut_gradient`` is empty.
        """
        result = self._step(node_id, activations, labels, before_step, cut_gradient)
        self._count(node_id, len(labels))
        return result

    @abstractmethod
    def _step(
        self,
        node_id: int,
        activations: torch.Tensor,
        labels: torch.Tensor,
        before_step: BeforeStep | None,
        cut_gradient: bool = True,
    ) -> StepResult:
        """Variant-specific update for one batch."""

    def client_copies(self, node_ids: list[int]) -> dict[int, nn.Module]:
        """Return the server-half copies of ``node_ids`` to average (none for one shared half)."""
        return {}

    def load_merged(self, state: Mapping[str, torch.Tensor]) -> None:
        """Make ``state`` (the average of :meth:`client_copies`) the global server half."""
        self.server_half.load_state_dict(state)

    def close(self) -> None:  # noqa: B027 - optional hook; most trainers hold no threads
        """Release threads the trainer holds."""

    @abstractmethod
    def discard_round(self) -> None:
        """Undo what the current round did to the global server half (the round is dropped)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The global server half and the optimizer state, for a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _count(self, node_id: int, examples: int) -> None:
        with self._counts_lock:
            self.steps_by_node[node_id] = self.steps_by_node.get(node_id, 0) + 1
            self.examples_by_node[node_id] = self.examples_by_node.get(node_id, 0) + examples

    def _train_on_batch(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        activations: torch.Tensor,
        labels: torch.Tensor,
        before_step: BeforeStep | None = None,
        cut_gradient: bool = True,
    ) -> StepResult:
        """Forward, backward, every check, then one optimizer step: the one update rule.

        ``cut_gradient=False`` skips the gradient at the cut: the activations enter as a leaf
        that needs no gradient, and autograd stops at the server half's first layer.
        """
        buffers = _buffers(module)  # the forward pass updates BatchNorm statistics
        try:
            leaf = activations.to(self.device).detach().requires_grad_(cut_gradient)
            labels = labels.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            outputs: torch.Tensor = module(leaf)
            loss = self.loss_fn(outputs, labels)
            if loss.dim() != 0:
                raise RefusedBatch(
                    f"the loss of a batch has shape {tuple(loss.shape)}; it must be one number "
                    "(a loss that averages over the batch, like nn.CrossEntropyLoss())"
                )
            _check_buffers(module)
            if loss.requires_grad:  # a frozen server half under local-loss has nothing to learn
                loss.backward()
            gradient = self._checked_gradients(loss, module, leaf if cut_gradient else None)
            result = StepResult(
                cut_gradient=gradient,
                loss=float(loss.detach()),
                correct=_correct(outputs.detach(), labels),
            )
            if before_step is not None:
                before_step(result)
        except Exception:
            _restore(module, buffers)
            optimizer.zero_grad(set_to_none=True)
            raise
        optimizer.step()
        return result

    def _checked_gradients(
        self, loss: torch.Tensor | None, module: nn.Module, leaf: torch.Tensor | None
    ) -> torch.Tensor:
        """The gradient at the cut (empty without a ``leaf``), once the loss and every gradient
        are finite and bounded."""
        if loss is not None and not bool(torch.isfinite(loss)):
            raise RefusedBatch(
                f"the loss of this batch is {float(loss)}; a step on it would make the server "
                "half non-finite. Check the labels and the activations the client sends"
            )
        cut_gradient = leaf.grad if leaf is not None else torch.empty(0)
        assert cut_gradient is not None  # a leaf that requires grad, after backward
        gradients = [p.grad for p in module.parameters() if p.grad is not None]
        largest = _largest_magnitude([cut_gradient, *gradients])
        if not largest <= self.max_abs_gradient:  # NaN fails this comparison too
            raise RefusedBatch(
                f"this batch gives gradients of magnitude {largest:.3g}, beyond "
                f"max_abs_gradient={self.max_abs_gradient:g}; a step on them would make the "
                "server half non-finite. Check the activations the client sends (their scale)"
            )
        return cut_gradient.detach().cpu()

    # -- evaluation: the global server half in eval mode, nothing trained ------------------------

    def begin_evaluation(self) -> None:
        """Put the global server half in eval mode for an evaluation round."""
        self.server_half.eval()

    def end_evaluation(self) -> None:
        """Back to training mode after an evaluation round."""
        self.server_half.train()

    @torch.no_grad()
    def evaluate_loss(self, activations: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """The loss and the correct count of the global server half on one batch."""
        outputs = self.server_half(activations.to(self.device))
        labels = labels.to(self.device)
        loss = self.loss_fn(outputs, labels)
        if loss.dim() != 0:
            raise RefusedBatch(f"the loss of a batch has shape {tuple(loss.shape)}, not ()")
        return float(loss), _correct(outputs, labels)

    @torch.no_grad()
    def evaluate_outputs(self, activations: torch.Tensor) -> torch.Tensor:
        """The label-private split: the global server half's output on one batch."""
        outputs: torch.Tensor = self.server_half(activations.to(self.device))
        return outputs.cpu()

    # -- the label-private (U-shaped) split: one batch, two exchanges ----------------------------

    def forward_server_half(self, node_id: int, activations: torch.Tensor) -> torch.Tensor:
        """Run the server half on a batch from ``node_id``; return its output.

        The graph is kept until :meth:`backward_server_half` (or :meth:`abandon_server_half`)
        for the same node: the update of one batch spans the client's round trip through its
        head. SFLV2 holds its one server half for the batch in between, so batches of different
        clients are still applied one at a time.
        """
        module, optimizer = self._module_for(node_id)
        self._hold(node_id)
        buffers = _buffers(module)
        try:
            leaf = activations.to(self.device).requires_grad_(True)
            outputs: torch.Tensor = module(leaf)
            _check_buffers(module)
            if not bool(torch.isfinite(outputs).all()):
                raise RefusedBatch(
                    "the server half's output on this batch is not finite; check the scale of "
                    "the activations the client sends"
                )
        except BaseException:
            _restore(module, buffers)
            self._let_go(node_id)
            raise
        with self._counts_lock:
            self._pending[node_id] = _Pending(
                module, optimizer, leaf, outputs, buffers, time.monotonic()
            )
        return outputs.detach().cpu()

    def backward_server_half(
        self,
        node_id: int,
        output_gradient: torch.Tensor,
        *,
        before_step: BeforeStep | None = None,
    ) -> StepResult:
        """Backpropagate the client's gradient at the server half's output, step the optimizer,
        and return the gradient at the cut. ``loss`` is NaN: the loss stays on the client.

        A refused gradient drops the batch: the server half is as before its forward pass."""
        with self._counts_lock:
            pending = self._pending.pop(node_id, None)
        if pending is None:
            raise RefusedBatch(f"node {node_id} has no batch waiting for its output gradient")
        try:
            pending.optimizer.zero_grad(set_to_none=True)
            pending.outputs.backward(output_gradient.to(self.device, pending.outputs.dtype))
            cut_gradient = self._checked_gradients(None, pending.module, pending.leaf)
            result = StepResult(cut_gradient=cut_gradient, loss=float("nan"), correct=0)
            if before_step is not None:
                before_step(result)
        except Exception:
            _restore(pending.module, pending.buffers)
            pending.optimizer.zero_grad(set_to_none=True)
            self._let_go(node_id)
            raise
        try:
            pending.optimizer.step()
        finally:
            self._let_go(node_id)
        self._count(node_id, len(pending.leaf))
        return result

    def abandon_server_half(self, node_id: int) -> None:
        """Drop a batch of ``node_id`` that will get no output gradient (its stream ended or its
        gradient did not come in time): the server half is as before its forward pass."""
        with self._counts_lock:
            pending = self._pending.pop(node_id, None)
        if pending is not None:
            _restore(pending.module, pending.buffers)
            self._let_go(node_id)

    def abandon_stale(self, older_than: float) -> list[int]:
        """Drop the waiting label-private batches whose forward pass is more than
        ``older_than`` seconds old; return their nodes."""
        now = time.monotonic()
        with self._counts_lock:
            stale = [n for n, p in self._pending.items() if now - p.started >= older_than]
        for node_id in stale:
            self.abandon_server_half(node_id)
        return stale

    def _module_for(self, node_id: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError(f"{type(self).__name__} does not serve the label-private split")

    def _hold(self, node_id: int) -> None:  # noqa: B027 - optional hook
        """Reserve what a label-private batch of ``node_id`` updates (nothing to reserve here)."""

    def _let_go(self, node_id: int) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`_hold` reserved."""


class SFLV1Trainer(ServerHalfTrainer):
    """SFLV1: one server-half copy and optimizer per client, averaged when the rounds merge.

    Copies of different clients never share a lock, so concurrent clients train in parallel.
    What the server holds grows with the clients since the last merge, not with every client
    ever seen: a client's copy starts from the global server half with a fresh optimizer the
    first time it is selected after a merge (as in the SplitFed paper, where the server-side
    models restart from their average), goes on from itself in the rounds up to the next merge
    (``merge_every``), and is dropped by the merge; the memory of dropped copies is reused for the
    next ones. Memory: the global server half, plus one server half and one optimizer state per
    client selected since the last merge (per client of the round with ``merge_every=1``).
    Averaging the copies is the strategy's job (Flower's FedAvg).
    """

    variant = Variant.V1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._copies: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
        self._spare: list[nn.Module] = []

    def begin_round(self, node_ids: list[int]) -> None:
        super().begin_round(node_ids)
        global_state = self.server_half.state_dict()
        for node_id in dict.fromkeys(node_ids):
            if node_id in self._copies:
                continue  # no merge since its last round: it goes on from its own copy
            module = self._spare.pop() if self._spare else copy.deepcopy(self.server_half)
            module.load_state_dict(global_state)
            module.train()
            self._copies[node_id] = (module, self.optimizer_config.build(module.parameters()))
        self._spare.clear()  # more spares than new clients: free them

    def _release_copies(self) -> None:
        self._spare.extend(module for module, _ in self._copies.values())
        self._copies = {}

    def _step(
        self,
        node_id: int,
        activations: torch.Tensor,
        labels: torch.Tensor,
        before_step: BeforeStep | None,
        cut_gradient: bool = True,
    ) -> StepResult:
        module, optimizer = self._module_for(node_id)
        return self._train_on_batch(
            module, optimizer, activations, labels, before_step, cut_gradient
        )

    def client_copies(self, node_ids: list[int]) -> dict[int, nn.Module]:
        return {n: self._copies[n][0] for n in node_ids if n in self._copies}

    def _module_for(self, node_id: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        try:
            return self._copies[node_id]
        except KeyError:
            raise RefusedBatch(f"node {node_id} is not a client of this round") from None

    def load_merged(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_merged(state)
        self._release_copies()

    def copy_for(self, node_id: int) -> nn.Module:
        """Return the server-half copy of ``node_id`` in this round (for inspection and tests)."""
        return self._copies[node_id][0]

    def discard_round(self) -> None:
        # The global half is only written by a merge; the copies restart from it.
        self._release_copies()

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints follow merges, after which no copy or optimizer state is kept.
        return {"server_half": self.server_half.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_half.load_state_dict(state["server_half"])
        self._release_copies()


class SFLV2Trainer(ServerHalfTrainer):
    """SFLV2: one server half and optimizer; batches are applied one at a time, in arrival order.

    All steps run on a single worker thread fed by a FIFO queue, so the order of updates is the
    order in which batches arrived, whatever threads the split server serves them on.
    """

    variant = Variant.V2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = self.optimizer_config.build(self.server_half.parameters())
        self._worker: ThreadPoolExecutor | None = None
        self._worker_lock = threading.Lock()
        self._round_start: dict[str, Any] | None = None
        # Held from a label-private batch's forward pass to its backward pass.
        self._half_lock = threading.Lock()

    def _module_for(self, node_id: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.server_half, self.optimizer

    def _hold(self, node_id: int) -> None:
        self._half_lock.acquire()

    def _let_go(self, node_id: int) -> None:
        self._half_lock.release()

    def begin_round(self, node_ids: list[int]) -> None:
        super().begin_round(node_ids)
        # Kept so that a dropped round (too few clients finished) can be undone.
        self._round_start = copy.deepcopy(self.state_dict())

    def discard_round(self) -> None:
        if self._round_start is not None:
            self.load_state_dict(self._round_start)

    def state_dict(self) -> dict[str, Any]:
        return {
            "server_half": self.server_half.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_half.load_state_dict(state["server_half"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _step(
        self,
        node_id: int,
        activations: torch.Tensor,
        labels: torch.Tensor,
        before_step: BeforeStep | None,
        cut_gradient: bool = True,
    ) -> StepResult:
        with self._worker_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="sflv2-server-half"
                )
            worker = self._worker
        return worker.submit(
            self._train_on_batch,
            self.server_half,
            self.optimizer,
            activations,
            labels,
            before_step,
            cut_gradient,
        ).result()

    def close(self) -> None:
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)


def _buffers(module: nn.Module) -> list[torch.Tensor]:
    """Copies of ``module``'s buffers (BatchNorm statistics), to undo a refused forward pass."""
    return [buffer.detach().clone() for buffer in module.buffers()]


def _restore(module: nn.Module, saved: Iterable[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved, strict=True):
            buffer.copy_(value)


def _check_buffers(module: nn.Module) -> None:
    """Refuse a forward pass that made a buffer (a BatchNorm statistic) non-finite."""
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
            raise RefusedBatch(
                f"this batch makes the server half's {name} non-finite; check the scale of the "
                "activations the client sends"
            )


def _largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """The largest absolute value among ``tensors``; NaN if any holds a NaN."""
    # aminmax is one pass over a tensor; torch's inf-norm on the CPU is several times slower.
    peaks = [extreme for t in tensors if t.numel() for extreme in t.detach().aminmax()]
    return float(torch.stack(peaks).abs().amax()) if peaks else 0.0


def _correct(outputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Examples whose highest output is their label (0 for outputs that are not class scores)."""
    if (
        outputs.dim() != 2
        or labels.dim() != 1
        or labels.is_floating_point()
        or len(labels) != len(outputs)
    ):
        return 0
    return int((outputs.argmax(dim=1) == labels).sum())


def make_trainer(
    variant: str,
    *,
    server_copies: str | None = None,
    batched: bool = False,
    batch_window: float = 0.001,
    **kwargs: Any,
) -> ServerHalfTrainer:
    """Return the trainer for ``variant``, built with ``kwargs``.

    ``"v1"`` is :class:`SFLV1Trainer` and ``"v2"`` :class:`SFLV2Trainer`. ``"local-loss"``
    trains with the rule ``server_copies`` names: ``"shared"`` (the default; SFLV2's one half in
    arrival order) or ``"per-client"`` (SFLV1's copies, averaged when the round merges).
    ``batched=True`` runs the steps of copies that arrive within ``batch_window`` seconds as one
    vectorised pass (:class:`splitfed.batched.BatchedSFLV1Trainer`; for accelerators, slower on
    a CPU); it applies only where there is one copy per client.
    """
    variant = Variant.validate(variant)
    if variant != Variant.LOCAL_LOSS:
        if server_copies is not None:
            raise ValueError(
                f"server_copies chooses how the local-loss variant keeps the server half; "
                f"variant {variant!r} has its own (v1: one copy per client, v2: one shared "
                "half). Leave server_copies unset"
            )
        per_client = variant == Variant.V1
    else:
        copies = ServerCopies.validate(server_copies or ServerCopies.SHARED)
        per_client = copies == ServerCopies.PER_CLIENT
    if not per_client:
        if batched:
            raise ValueError(
                "batched=True stacks the server-half copies of concurrent clients; this variant "
                "trains one shared half in arrival order, which has nothing to stack. Use "
                "variant 'v1' (or local-loss with server_copies='per-client'), or batched=False"
            )
        return SFLV2Trainer(**kwargs)
    if batched:
        from .batched import BatchedSFLV1Trainer  # noqa: PLC0415 (it builds on this module)

        return BatchedSFLV1Trainer(max_wait=batch_window, **kwargs)
    return SFLV1Trainer(**kwargs)
