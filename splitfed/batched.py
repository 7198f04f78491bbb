"""SFLV1 with the steps of concurrent clients batched into one computation.

In SFLV1 every client of a round trains its own copy of the server half, one small forward and
backward pass per batch. On a GPU such small passes cost mostly kernel launches and host-device
synchronisation, not arithmetic; :class:`BatchedSFLV1Trainer` runs the steps of clients whose
batches arrive at about the same time as one vectorised pass over their stacked copies
(``torch.func.vmap`` of ``torch.func.grad_and_value`` of ``torch.func.functional_call``), then
updates each copy and optimizer as :class:`~splitfed.server_half.SFLV1Trainer` would.

It is meant for an accelerator. On a CPU the arithmetic dominates, concurrent unbatched steps
already use every core, and a vectorised convolution runs as a grouped one, which is slower
there: batched steps are slower on a CPU than unbatched ones.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .server_half import BeforeStep, RefusedBatch, SFLV1Trainer, StepResult

__all__ = ["BatchedSFLV1Trainer"]

logger = logging.getLogger("flwr_splitfed")

_Key = tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype, bool]
"""What batches must share to be stacked: the shape and dtype of activations and of labels, and
whether the gradient at the cut is asked for."""


@dataclass
class _Computed:
    """One batched pass over a group, the per-client values already on the host."""

    grads: list[torch.Tensor]
    """Stacked gradients of the trainable parameters, in ``parameters()`` order."""
    buffers: list[torch.Tensor]
    """Stacked buffers after the forward pass, in ``buffers()`` order."""
    buffer_names: list[str]
    cut_gradients: torch.Tensor
    losses: list[float]
    peaks: list[float]
    correct: list[int]
    nonfinite_buffer: list[str | None]
    """Per client, the first floating buffer the forward pass made non-finite."""


class _Fallback:
    """A group whose batched pass failed; its clients step one by one, and report back."""

    def __init__(self, size: int, error: BaseException) -> None:
        self.left = size
        self.all_succeeded = True
        self.error = error


@dataclass(eq=False)
class _Request:
    node_id: int
    module: nn.Module
    optimizer: torch.optim.Optimizer
    activations: torch.Tensor
    labels: torch.Tensor
    cut_gradient: bool
    ready: threading.Event = field(default_factory=threading.Event)
    computed: _Computed | None = None
    index: int = 0
    fallback: _Fallback | None = None


@dataclass(eq=False)
class _Bucket:
    """Requests that wait to be stacked; closed once full or when its window ends."""

    closed: threading.Condition
    deadline: float
    requests: list[_Request] = field(default_factory=list)


class BatchedSFLV1Trainer(SFLV1Trainer):
    """SFLV1 whose concurrent steps run as one vectorised pass over the clients' stacked copies.

    The update rule is SFLV1's (see :class:`~splitfed.server_half.SFLV1Trainer`): one copy and
    one optimizer per client. Only how the forward and backward passes are run differs.

    Grouping. A step joins the open group of steps whose activations and labels have its shape
    and dtype; the first step of a group waits up to ``max_wait`` seconds for others to join, or
    less once ``max_group`` steps (or every client of the round) have joined, then runs the
    group on its own thread: one ``vmap``-ed forward and backward over the stacked parameters,
    buffers, activations and labels, and one transfer to the host of every client's loss,
    gradient bound, correct count and gradient at the cut. Each client's own thread then checks
    its share, calls its ``before_step`` and steps its own optimizer on its own copy; so the
    steps of one client stay in order, a client's thread never waits on another's optimizer, and
    any torch optimizer works. A step alone in its window, or with batches of a shape no other
    waiting step has, runs unbatched, exactly as in SFLV1. Steps without a gradient at the cut
    (``cut_gradient=False``, local-loss training) group with one another. Label-private batches
    (two exchanges) are never batched.

    Checks. Every check of SFLV1 holds per client, before any change: a client whose forward
    pass makes a buffer non-finite, whose loss is not finite, whose gradients (of the server
    half or at the cut) exceed ``max_abs_gradient``, or whose ``before_step`` raises is refused
    with :class:`~splitfed.server_half.RefusedBatch` (or that exception) and its copy, buffers
    and optimizer state stay bit-identical; the other clients of its group step.

    Equality. A batched step computes what the unbatched step computes, up to the rounding of
    batched kernels (a grouped convolution or a batched matrix product sums in another order):
    for float32 server halves, parameters, buffers, optimizer states, losses and gradients at
    the cut agree within a relative tolerance of 1e-5 (absolute 1e-6) over several steps. (An
    optimizer that normalises its step, like Adam, turns a gradient that is zero up to rounding,
    such as a bias right before BatchNorm's, into a step of ``lr`` whose sign the rounding picks;
    such a parameter differs between any two summation orders, batched or not.) Random
    layers (dropout) draw independent values for each client (``randomness="different"``), as
    separate steps would, but not the same values.

    BatchNorm. In training mode its running statistics are buffers; they are stacked like the
    parameters, each client's forward pass normalises with its own batch's statistics and
    updates its own slice of the running statistics in place, which is written back to its copy
    once the step is accepted: BatchNorm batches within the tolerance above. Buffers must be
    updated in place, as BatchNorm does; a module that assigns a new tensor to a buffer in its
    forward pass loses that update here. ``BatchNorm(momentum=None)`` (a cumulative average)
    reads its batch count as a Python number, which a vectorised pass cannot do: like any model
    the vectorised pass fails on, it falls back (below).

    Fallback. If the batched pass of a group fails, each client of the group steps unbatched on
    its own thread (so each gets its own result or refusal). If every one of them then succeeds,
    the failure was the model's, not a batch's: batching is turned off for this trainer,
    :attr:`batching_off` says why, and all later steps run unbatched.

    Parameters
    ----------
    max_wait : float (default: 0.001)
        Seconds the first step of a group waits for others. A lone client pays it once per step;
        it should be below the time one unbatched step takes on the device.
    max_group : int (default: 64)
        Most steps in one group; a full group runs at once. 1 turns batching off.
    **kwargs
        As for :class:`~splitfed.server_half.ServerHalfTrainer`: ``server_half``,
        ``optimizer``, ``loss_fn`` (default: None, ``nn.CrossEntropyLoss()``), ``device``
        (default: "cpu"), ``max_abs_gradient`` (default: 1e10). The loss must be computable for
        each client separately under ``vmap`` (no ``.item()`` or data-dependent Python control
        flow), or batching turns itself off.

    Attributes
    ----------
    batched_calls : int
        Vectorised passes run so far (one per group of two or more steps).
    batched_steps : int
        Steps served by a vectorised pass, refused ones included.
    unbatched_steps : int
        Steps run one at a time.
    batching_off : str | None
        Why batching was turned off, or ``None`` while it is on.
    """

    def __init__(self, *, max_wait: float = 0.001, max_group: int = 64, **kwargs: Any) -> None:
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError(f"max_wait must be a non-negative number of seconds; got {max_wait}")
        if max_group < 1:
            raise ValueError(
                f"max_group must be at least 1 (1 turns batching off); got {max_group}"
            )
        super().__init__(**kwargs)
        self.max_wait = float(max_wait)
        self.max_group = int(max_group)
        self._group_lock = threading.Lock()
        self._open: dict[_Key, _Bucket] = {}
        self._node_locks: dict[int, threading.Lock] = {}
        self.batched_calls = 0
        self.batched_steps = 0
        self.unbatched_steps = 0
        self.batching_off: str | None = None

    # -- grouping -------------------------------------------------------------------------------

    def _step(
        self,
        node_id: int,
        activations: torch.Tensor,
        labels: torch.Tensor,
        before_step: BeforeStep | None,
        cut_gradient: bool = True,
    ) -> StepResult:
        module, optimizer = self._module_for(node_id)
        # Steps of one client run one after the other: two of them must never share a group.
        with self._node_lock(node_id):
            request = _Request(node_id, module, optimizer, activations, labels, cut_gradient)
            group = self._join(request)
            if group is not None:
                self._run_group(group)
            else:
                request.ready.wait()
            return self._finish(request, before_step)

    def _node_lock(self, node_id: int) -> threading.Lock:
        with self._group_lock:
            return self._node_locks.setdefault(node_id, threading.Lock())

    def _join(self, request: _Request) -> list[_Request] | None:
        """Add ``request`` to the open group of its shape; return the group once closed if
        ``request`` opened it (it then runs the group), else ``None`` (it waits to be run)."""
        key: _Key = (
            tuple(request.activations.shape),
            request.activations.dtype,
            tuple(request.labels.shape),
            request.labels.dtype,
            request.cut_gradient,
        )
        with self._group_lock:
            # A full group cannot grow past the clients that hold a copy this round.
            limit = min(self.max_group, len(self._copies))
            if self.batching_off is not None or limit < 2 or not self._differentiable(request):
                return [request]
            bucket = self._open.get(key)
            opener = bucket is None
            if bucket is None:
                bucket = _Bucket(
                    threading.Condition(self._group_lock), time.monotonic() + self.max_wait
                )
                self._open[key] = bucket
            bucket.requests.append(request)
            if len(bucket.requests) >= limit:
                del self._open[key]  # later steps open a new group
                bucket.closed.notify()
            if not opener:
                return None
            while self._open.get(key) is bucket:
                remaining = bucket.deadline - time.monotonic()
                if remaining <= 0:
                    del self._open[key]
                    break
                bucket.closed.wait(remaining)
            return bucket.requests

    @staticmethod
    def _differentiable(request: _Request) -> bool:
        """Whether a step has anything to differentiate (a frozen half under local-loss has
        not, and runs alone, as unbatched: without a backward pass)."""
        return request.cut_gradient or any(p.requires_grad for p in request.module.parameters())

    def _run_group(self, requests: list[_Request]) -> None:
        """Run the batched pass of a closed group and hand each request its share."""
        try:
            if len(requests) > 1:
                try:
                    computed = self._compute(requests)
                except Exception as err:
                    fallback = _Fallback(len(requests), err)
                    for request in requests:
                        request.fallback = fallback
                else:
                    for index, request in enumerate(requests):
                        request.computed, request.index = computed, index
                    with self._group_lock:
                        self.batched_calls += 1
                        self.batched_steps += len(requests)
        finally:
            # Whatever happened, no request is left waiting; without a share it runs alone.
            for request in requests:
                request.ready.set()

    # -- one group: a vectorised forward and backward pass --------------------------------------

    def _compute(self, requests: list[_Request]) -> _Computed:
        """Forward and backward of every request's batch on its own copy, as one pass."""
        # The first copy lends its structure: functional_call swaps in the stacked tensors for
        # the call, and its client's lock keeps every other thread off it meanwhile.
        template = requests[0].module
        modules = [request.module for request in requests]
        trainable: dict[str, torch.Tensor] = {}
        others: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for (name, first), column in zip(
                template.named_parameters(),
                zip(*(module.parameters() for module in modules), strict=True),
                strict=True,
            ):
                stacked = torch.stack([parameter.detach() for parameter in column])
                (trainable if first.requires_grad else others)[name] = stacked
            buffer_names = [name for name, _ in template.named_buffers()]
            buffers = [
                torch.stack([buffer.detach() for buffer in column])
                for column in zip(*(module.buffers() for module in modules), strict=True)
            ]
            others.update(zip(buffer_names, buffers, strict=True))
            # One transfer for the group (activations arrive on the host).
            activations = torch.stack([r.activations for r in requests]).to(self.device)
            labels = torch.stack([r.labels for r in requests]).to(self.device)
        loss_fn = self.loss_fn

        def client_loss(
            trainable: dict[str, torch.Tensor],
            others: dict[str, torch.Tensor],
            activations: torch.Tensor,
            labels: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            outputs: torch.Tensor = functional_call(
                template, {**trainable, **others}, (activations,)
            )
            return loss_fn(outputs, labels), outputs.detach()

        # The buffers in ``others`` are updated in place: each client's slice by its own batch.
        with_cut = requests[0].cut_gradient  # the same in a group
        gradients, (losses, outputs) = vmap(
            grad_and_value(client_loss, argnums=(0, 2) if with_cut else 0, has_aux=True),
            randomness="different",
        )(trainable, others, activations, labels)
        param_grads, cut_grads = gradients if with_cut else (gradients, None)
        grads = [param_grads[name] for name in trainable]
        return self._summarise(
            grads, buffers, buffer_names, cut_grads, losses.detach(), outputs, labels
        )

    def _summarise(
        self,
        grads: list[torch.Tensor],
        buffers: list[torch.Tensor],
        buffer_names: list[str],
        cut_grads: torch.Tensor | None,
        losses: torch.Tensor,
        outputs: torch.Tensor,
        labels: torch.Tensor,
    ) -> _Computed:
        """Every client's numbers that the checks need, brought to the host in few transfers.
        ``cut_grads`` is ``None`` when no gradient at the cut was asked for."""
        size = len(losses)
        measured = grads if cut_grads is None else [cut_grads, *grads]
        with torch.no_grad():
            # The largest magnitude of each client's gradients; NaN propagates, as unbatched.
            peaks = torch.stack(
                [
                    torch.linalg.vector_norm(g.reshape(size, -1), ord=math.inf, dim=1).float()
                    for g in measured
                    if g[0].numel()
                ]
            ).amax(dim=0)
            floating = [
                (n, b) for n, b in zip(buffer_names, buffers, strict=True) if b.is_floating_point()
            ]
            finite = [torch.isfinite(b.reshape(size, -1)).all(dim=1) for _, b in floating]
            if (
                outputs.dim() == 3
                and labels.dim() == 2
                and not labels.is_floating_point()
                and outputs.shape[1] == labels.shape[1]
            ):
                correct = (outputs.argmax(dim=2) == labels).sum(dim=1).float()
            else:  # outputs that are not class scores, as unbatched
                correct = torch.zeros(size, device=outputs.device)
            summary = torch.cat([peaks, correct, *(f.float() for f in finite)]).cpu().tolist()
            loss_values = losses.cpu().tolist()
            cut_gradients = torch.empty(size, 0) if cut_grads is None else cut_grads.detach().cpu()
        nonfinite: list[str | None] = []
        for k in range(size):
            flags = summary[2 * size + k :: size]
            bad = [name for (name, _), flag in zip(floating, flags, strict=True) if not flag]
            nonfinite.append(bad[0] if bad else None)
        return _Computed(
            grads=grads,
            buffers=buffers,
            buffer_names=buffer_names,
            cut_gradients=cut_gradients,
            losses=[float(v) for v in loss_values],
            peaks=summary[:size],
            correct=[int(v) for v in summary[size : 2 * size]],
            nonfinite_buffer=nonfinite,
        )

    # -- one client: checks, before_step, its own optimizer -------------------------------------

    def _finish(self, request: _Request, before_step: BeforeStep | None) -> StepResult:
        if request.computed is None:
            return self._step_alone(request, before_step)
        computed, k = request.computed, request.index
        module, optimizer = request.module, request.optimizer
        bad = computed.nonfinite_buffer[k]
        if bad is not None:
            raise RefusedBatch(
                f"this batch makes the server half's {bad} non-finite; check the scale of the "
                "activations the client sends"
            )
        loss = computed.losses[k]
        if not math.isfinite(loss):
            raise RefusedBatch(
                f"the loss of this batch is {loss}; a step on it would make the server "
                "half non-finite. Check the labels and the activations the client sends"
            )
        largest = computed.peaks[k]
        if not largest <= self.max_abs_gradient:  # NaN fails this comparison too
            raise RefusedBatch(
                f"this batch gives gradients of magnitude {largest:.3g}, beyond "
                f"max_abs_gradient={self.max_abs_gradient:g}; a step on them would make the "
                "server half non-finite. Check the activations the client sends (their scale)"
            )
        # A view would keep the whole group's gradients alive for as long as the reply lives.
        result = StepResult(
            cut_gradient=computed.cut_gradients[k].clone(), loss=loss, correct=computed.correct[k]
        )
        if before_step is not None:
            before_step(result)
        # Accepted: only now does the copy take this batch's buffers and gradients.
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, stacked in zip(module.buffers(), computed.buffers, strict=True):
                buffer.copy_(stacked[k])
        trainable = [p for p in module.parameters() if p.requires_grad]
        for parameter, grad in zip(trainable, computed.grads, strict=True):
            parameter.grad = grad[k]
        optimizer.step()
        # The gradients are views of the group's: drop them rather than hold the group.
        optimizer.zero_grad(set_to_none=True)
        return result

    def _step_alone(self, request: _Request, before_step: BeforeStep | None) -> StepResult:
        fallback = request.fallback
        try:
            result = self._train_on_batch(
                request.module,
                request.optimizer,
                request.activations,
                request.labels,
                before_step,
                cut_gradient=request.cut_gradient,
            )
        except BaseException:
            if fallback is not None:
                self._report(fallback, succeeded=False)
            raise
        if fallback is not None:
            self._report(fallback, succeeded=True)
        with self._group_lock:
            self.unbatched_steps += 1
        return result

    def _report(self, fallback: _Fallback, *, succeeded: bool) -> None:
        """Count a fallback step; once all are in, turn batching off if none of them failed."""
        with self._group_lock:
            fallback.left -= 1
            fallback.all_succeeded &= succeeded
            if fallback.left or not fallback.all_succeeded or self.batching_off is not None:
                return
            lines = str(fallback.error).strip().splitlines()
            reason = f"{type(fallback.error).__name__}: {lines[0] if lines else ''}"
            self.batching_off = reason if len(reason) <= 200 else reason[:197] + "..."
            # Steps waiting for a group would wait for steps that no longer join one.
            for bucket in self._open.values():
                bucket.closed.notify()
            self._open.clear()
        logger.warning(
            "SFLV1 steps are no longer batched: the batched pass failed on a group whose every "
            "step succeeded alone (%s); each step now runs alone",
            self.batching_off,
        )
