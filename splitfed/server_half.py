"""How the split server updates the server half: SFLV1 and SFLV2.

A trainer takes one batch of cut-layer activations and labels at a time, runs the server half
forward and backward, steps the server-half optimizer, and returns the gradient at the cut.
The optimizers are built once and keep their state across batches and rounds.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import OptimizerConfig, Variant

__all__ = [
    "LossFn",
    "SFLV1Trainer",
    "SFLV2Trainer",
    "ServerHalfTrainer",
    "StepResult",
    "make_trainer",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """What one server-half step returns to the client."""

    cut_gradient: torch.Tensor
    loss: float
    correct: int


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
    """

    variant: str

    def __init__(
        self,
        *,
        server_half: nn.Module,
        optimizer: OptimizerConfig,
        loss_fn: LossFn | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.server_half = server_half.to(self.device).train()
        self.optimizer_config = optimizer
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self._counts_lock = threading.Lock()
        self._pending: dict[int, tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]] = {}
        self.steps_by_node: dict[int, int] = {}
        self.examples_by_node: dict[int, int] = {}

    def begin_round(self, node_ids: list[int]) -> None:
        """Prepare for a round in which ``node_ids`` stream batches."""
        with self._counts_lock:
            self.steps_by_node = {node_id: 0 for node_id in node_ids}
            self.examples_by_node = {node_id: 0 for node_id in node_ids}

    def step(self, node_id: int, activations: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Train the server half on one batch from ``node_id``; return the gradient at the cut."""
        result = self._step(node_id, activations, labels)
        with self._counts_lock:
            self.steps_by_node[node_id] = self.steps_by_node.get(node_id, 0) + 1
            self.examples_by_node[node_id] = self.examples_by_node.get(node_id, 0) + len(labels)
        return result

    @abstractmethod
    def _step(self, node_id: int, activations: torch.Tensor, labels: torch.Tensor) -> StepResult:
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
        """The global server half and the optimizer state(s), for a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _train_on_batch(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        activations: torch.Tensor,
        labels: torch.Tensor,
    ) -> StepResult:
        """Forward, backward and one optimizer step of ``module``: the one update rule."""
        activations = activations.to(self.device).requires_grad_(True)
        labels = labels.to(self.device)
        outputs = module(activations)
        loss = self.loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = _correct(outputs.detach(), labels)
        gradient = activations.grad
        assert gradient is not None  # a leaf that requires grad, after backward
        return StepResult(cut_gradient=gradient.cpu(), loss=float(loss.detach()), correct=correct)

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
        return float(self.loss_fn(outputs, labels)), _correct(outputs, labels)

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
        try:
            leaf = activations.to(self.device).requires_grad_(True)
            outputs: torch.Tensor = module(leaf)
        except BaseException:
            self._let_go(node_id)
            raise
        with self._counts_lock:
            self._pending[node_id] = (optimizer, leaf, outputs)
        return outputs.detach().cpu()

    def backward_server_half(self, node_id: int, output_gradient: torch.Tensor) -> StepResult:
        """Backpropagate the client's gradient at the server half's output, step the optimizer,
        and return the gradient at the cut. ``loss`` is NaN: the loss stays on the client."""
        with self._counts_lock:
            pending = self._pending.pop(node_id, None)
        if pending is None:
            raise RuntimeError(f"node {node_id} has no batch waiting for its output gradient")
        optimizer, leaf, outputs = pending
        try:
            optimizer.zero_grad(set_to_none=True)
            outputs.backward(output_gradient.to(self.device, outputs.dtype))
            optimizer.step()
        finally:
            self._let_go(node_id)
        with self._counts_lock:
            self.steps_by_node[node_id] = self.steps_by_node.get(node_id, 0) + 1
            self.examples_by_node[node_id] = self.examples_by_node.get(node_id, 0) + len(leaf)
        gradient = leaf.grad
        assert gradient is not None  # a leaf that requires grad, after backward
        return StepResult(cut_gradient=gradient.cpu(), loss=float("nan"), correct=0)

    def abandon_server_half(self, node_id: int) -> None:
        """Drop a batch of ``node_id`` that will get no output gradient (its stream ended)."""
        with self._counts_lock:
            pending = self._pending.pop(node_id, None)
        if pending is not None:
            self._let_go(node_id)

    def _module_for(self, node_id: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError(f"{type(self).__name__} does not serve the label-private split")

    def _hold(self, node_id: int) -> None:  # noqa: B027 - optional hook
        """Reserve what a label-private batch of ``node_id`` updates (nothing to reserve here)."""

    def _let_go(self, node_id: int) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`_hold` reserved."""


class SFLV1Trainer(ServerHalfTrainer):
    """SFLV1: one server-half copy and optimizer per client, averaged at the end of a round.

    Copies of different clients never share a lock, so concurrent clients train in parallel. A
    client's optimizer state persists across rounds; its copy's weights restart from the merged
    server half after every merge. Averaging the copies is the strategy's job (Flower's FedAvg).
    """

    variant = Variant.V1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._copies: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
        self._stale: set[int] = set()

    def begin_round(self, node_ids: list[int]) -> None:
        super().begin_round(node_ids)
        global_state = self.server_half.state_dict()
        for node_id in node_ids:
            if node_id not in self._copies:
                module = copy.deepcopy(self.server_half)
                self._copies[node_id] = (module, self.optimizer_config.build(module.parameters()))
            elif node_id in self._stale:
                self._copies[node_id][0].load_state_dict(global_state)
            self._stale.discard(node_id)

    def _step(self, node_id: int, activations: torch.Tensor, labels: torch.Tensor) -> StepResult:
        module, optimizer = self._copies[node_id]
        return self._train_on_batch(module, optimizer, activations, labels)

    def client_copies(self, node_ids: list[int]) -> dict[int, nn.Module]:
        return {n: self._copies[n][0] for n in node_ids if n in self._copies}

    def _module_for(self, node_id: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self._copies[node_id]

    def load_merged(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_merged(state)
        # Every copy restarts from the merged half when its node is next selected.
        self._stale.update(self._copies)

    def copy_for(self, node_id: int) -> nn.Module:
        """Return the server-half copy of ``node_id`` (for inspection and tests)."""
        return self._copies[node_id][0]

    def discard_round(self) -> None:
        # The global half is only written by a merge; the copies start over from it.
        self._stale.update(self._copies)

    def state_dict(self) -> dict[str, Any]:
        # Copies are not saved: checkpoints follow merges, after which every copy restarts
        # from the merged half. Their optimizer states are, by node id.
        return {
            "server_half": self.server_half.state_dict(),
            "optimizers": {node: opt.state_dict() for node, (_, opt) in self._copies.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_half.load_state_dict(state["server_half"])
        self._copies, self._stale = {}, set()
        for node_id, optimizer_state in state["optimizers"].items():
            module = copy.deepcopy(self.server_half)
            optimizer = self.optimizer_config.build(module.parameters())
            optimizer.load_state_dict(optimizer_state)
            self._copies[int(node_id)] = (module, optimizer)


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

    def _step(self, node_id: int, activations: torch.Tensor, labels: torch.Tensor) -> StepResult:
        with self._worker_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="sflv2-server-half"
                )
            worker = self._worker
        return worker.submit(
            self._train_on_batch, self.server_half, self.optimizer, activations, labels
        ).result()

    def close(self) -> None:
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)


def _correct(outputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Examples whose highest output is their label (0 for outputs that are not class scores)."""
    if outputs.dim() != 2 or labels.dim() != 1 or labels.is_floating_point():
        return 0
    return int((outputs.argmax(dim=1) == labels).sum())


def make_trainer(variant: str, **kwargs: Any) -> ServerHalfTrainer:
    """Return the trainer for ``variant`` ("v1" or "v2"), built with ``kwargs``."""
    trainers = {Variant.V1: SFLV1Trainer, Variant.V2: SFLV2Trainer}
    return trainers[Variant.validate(variant)](**kwargs)
