"""The client's side of SplitFed, independent of Flower: local epochs and local evaluation.

:func:`run_local_epochs` trains a client's parts of a :class:`~splitfed.SplitModel` through a
data plane, :func:`run_local_loss_epochs` trains them on their own loss while streaming to it
(the local-loss variant); :func:`evaluate_locally` evaluates them through it. Flower's
``ClientApp`` reaches them through the adapters in :mod:`splitfed.client`; a benchmark, an audit
or a notebook calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._state import modes_kept
from .cut import ModelInput, SplitModel
from .dataplane import DataPlane, LocalLossDataPlane, SplitServerError
from .privacy import PrivacyConfig, distance_correlation

__all__ = [
    "BatchSpec",
    "EvaluateStats",
    "LocalLossStats",
    "LossFn",
    "TrainStats",
    "evaluate_locally",
    "run_local_epochs",
    "run_local_loss_epochs",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "fine_label")
"""Keys a dict batch's labels are looked for under when :class:`BatchSpec` does not say."""


@dataclass(frozen=True)
class BatchSpec:
    """Which entries of a batch are the model's inputs, and which are the labels.

    Loaders yield ``(inputs, labels)`` tuples or lists (torch's ``TensorDataset``), or dicts
    (flwr-datasets, Hugging Face datasets: ``{"img": ..., "label": ...}``). By default a tuple's
    first entry is the input and its last the labels, and a dict's labels are found under one of
    :data:`LABEL_KEYS` with the one remaining key as the input. Say otherwise here, or pass a
    function ``batch -> (inputs, labels)`` wherever a ``BatchSpec`` is taken.

    Parameters
    ----------
    inputs : str | int | Sequence[str] | None (default: None)
        The key (dict batches) or position (tuple batches) of the input. Several keys give the
        model a dict of keyword arguments (e.g. ``("input_ids", "attention_mask")``).
    labels : str | int | None (default: None)
        The key or position of the labels.
    """

    inputs: str | int | Sequence[str] | None = None
    labels: str | int | None = None

    def unpack(self, batch: Any) -> tuple[ModelInput, torch.Tensor]:
        """Return ``(inputs, labels)`` of ``batch``; raise a ``TypeError`` that says the fix."""
        if isinstance(batch, Mapping):
            return self._unpack_dict(batch)
        if isinstance(batch, tuple | list) and len(batch) >= 2:
            inputs = batch[0 if self.inputs is None else self.inputs]  # type: ignore[index]
            labels = batch[-1 if self.labels is None else self.labels]  # type: ignore[index]
            return inputs, labels
        raise TypeError(
            f"a batch is a {type(batch).__name__}; expected an (inputs, labels) tuple or list, "
            "or a dict. Pass batch=BatchSpec(inputs=..., labels=...) or a function "
            "batch -> (inputs, labels)"
        )

    def _unpack_dict(self, batch: Mapping[str, Any]) -> tuple[ModelInput, torch.Tensor]:
        keys = list(batch)
        label_key = self.labels
        if label_key is None:
            found = [key for key in LABEL_KEYS if key in batch]
            if len(found) != 1:
                raise TypeError(
                    f"a batch is a dict with keys {keys}, and which one holds the labels is not "
                    f"clear; pass batch=BatchSpec(inputs=..., labels=...) naming them"
                )
            label_key = found[0]
        if label_key not in batch:
            raise TypeError(
                f"a batch has no labels under {label_key!r}; its keys are {keys}: name one of "
                "them in BatchSpec(labels=...)"
            )
        input_keys = self.inputs
        if input_keys is None:
            rest = [key for key in keys if key != label_key]
            if len(rest) != 1:
                raise TypeError(
                    f"a batch is a dict with keys {keys}; besides the labels ({label_key!r}) "
                    f"more than one key could be the input. Pass batch=BatchSpec(inputs=..., "
                    f"labels={label_key!r})"
                )
            input_keys = rest[0]
        if isinstance(input_keys, str | int):
            if input_keys not in batch:
                raise TypeError(
                    f"a batch has no input under {input_keys!r}; its keys are {keys}: name one "
                    "of them in BatchSpec(inputs=...)"
                )
            return batch[input_keys], batch[label_key]  # type: ignore[index]
        missing = [key for key in input_keys if key not in batch]
        if missing:
            raise TypeError(
                f"a batch has no inputs under {missing}; its keys are {keys}: name them in "
                "BatchSpec(inputs=...)"
            )
        return {key: batch[key] for key in input_keys}, batch[label_key]  # type: ignore[index]


Unpack = BatchSpec | Callable[[Any], tuple[ModelInput, torch.Tensor]]


def _unpacker(batch: Unpack | None) -> Callable[[Any], tuple[ModelInput, torch.Tensor]]:
    if batch is None:
        return BatchSpec().unpack
    if isinstance(batch, BatchSpec):
        return batch.unpack
    return batch


def _batches(
    loader: Iterable[Any], unpack: Callable[[Any], tuple[ModelInput, torch.Tensor]], device: Any
) -> Iterable[tuple[ModelInput, torch.Tensor]]:
    """``(inputs on device, labels)`` of each non-empty batch; the first one checked."""
    first = True
    for batch in loader:
        inputs, labels = unpack(batch)
        if first:
            _check_batch(inputs, labels)
            first = False
        if len(labels) == 0:
            continue
        yield _to(inputs, device), labels


def _check_batch(inputs: ModelInput, labels: Any) -> None:
    tensors = (
        list(inputs.values())
        if isinstance(inputs, Mapping)
        else list(inputs)
        if isinstance(inputs, tuple | list)
        else [inputs]
    )
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        kinds = [type(t).__name__ for t in tensors]
        raise TypeError(
            f"a batch's inputs are {kinds}; expected tensors (a tensor, a tuple or a dict of "
            "them). Give the loader a collate function or a dataset transform that makes tensors "
            "(with flwr-datasets: partition.with_format('torch'))"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError(
            f"a batch's labels are a {type(labels).__name__}; expected a tensor with one label per "
            "example (batch dimension first)"
        )
    if labels.shape[0] != tensors[0].shape[0]:
        raise TypeError(
            f"a batch has {tensors[0].shape[0]} inputs and {labels.shape[0]} labels; they must "
            "match. Check which entries are the inputs and which the labels (BatchSpec)"
        )


def _to(inputs: ModelInput, device: Any) -> ModelInput:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {key: value.to(device) for key, value in inputs.items()}
    return tuple(value.to(device) for value in inputs)


def _call(module: nn.Module, inputs: ModelInput) -> torch.Tensor:
    if isinstance(inputs, Mapping):
        return module(**inputs)  # type: ignore[no-any-return]
    if isinstance(inputs, tuple):
        return module(*inputs)  # type: ignore[no-any-return]
    return module(inputs)  # type: ignore[no-any-return]


def _device(split: SplitModel) -> torch.device:
    parameter = next(split.client_half.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class TrainStats:
    """What a client's local training did."""

    num_examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, int | float]:
        """Flower-style metrics: ``num-examples`` weights FedAvg."""
        n = max(self.num_examples, 1)
        return {
            "num-examples": self.num_examples,
            "train-loss": self.loss_sum / n,
            "train-accuracy": self.correct / n,
            "steps": self.steps,
            "train-seconds": self.seconds,
        }


@dataclass
class LocalLossStats(TrainStats):
    """What a client's local-loss training did: ``loss_sum`` and ``correct`` are its auxiliary
    head's; the ``server_`` fields come from the split server's acknowledgements."""

    sent_batches: int = 0
    server_examples: int = 0
    server_loss_sum: float = 0.0
    server_correct: int = 0

    def metrics(self) -> dict[str, int | float]:
        """:meth:`TrainStats.metrics` (the auxiliary head's loss and accuracy), the batches
        sent, and the server half's loss and accuracy on them."""
        n = max(self.server_examples, 1)
        return {
            **super().metrics(),
            "sent-batches": self.sent_batches,
            "server-loss": self.server_loss_sum / n,
            "server-accuracy": self.server_correct / n,
        }


@dataclass
class EvaluateStats:
    """What a client's local evaluation found."""

    num_examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0

    def metrics(self) -> dict[str, int | float]:
        """Flower-style metrics: ``num-examples`` weights the aggregation."""
        n = max(self.num_examples, 1)
        return {
            "num-examples": self.num_examples,
            "eval-loss": self.loss_sum / n,
            "eval-accuracy": self.correct / n,
        }


def run_local_epochs(
    *,
    split: SplitModel,
    data_plane: DataPlane,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    local_epochs: int = 1,
    proximal_mu: float = 0.0,
    loss_fn: LossFn | None = None,
    privacy: PrivacyConfig | None = None,
    generator: torch.Generator | None = None,
    batch: Unpack | None = None,
) -> TrainStats:
    """Train the client's parts of ``split`` for ``local_epochs`` over ``train_loader``.

    For each batch: forward the client half, send the activations and labels, receive the
    gradient at the cut, backpropagate it through the graph kept from the forward pass, and step
    ``optimizer``. With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` is
    added to the client's loss, ``w_start`` being the weights it started the round with.

    In the label-private split (``split.client_head``), labels stay here: the activations go up
    alone, the server half's output comes back, the client head and ``loss_fn`` (default:
    cross-entropy, averaged over the batch) run on it, the gradient at the server half's output
    goes up and the gradient at the cut comes back. ``optimizer`` must hold
    :meth:`~splitfed.SplitModel.client_parameters`. ``privacy`` applies the client-side defenses
    to what leaves the client (noise drawn from ``generator``); DP-SGD comes from wrapping the
    parts and the optimizer with :meth:`~splitfed.PrivacyConfig.training` first.

    Parameters
    ----------
    batch : BatchSpec | Callable | None (default: None)
        How to find the inputs and the labels in a batch (see :class:`BatchSpec`).
    """
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be at least 1; got {local_epochs}")
    device = _device(split)
    parameters = split.client_parameters()
    start_weights = [p.detach().clone() for p in parameters] if proximal_mu > 0 else []
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    defended = privacy is not None and privacy.enabled
    unpack = _unpacker(batch)
    stats = TrainStats()
    started = time.perf_counter()
    for module in split.client_modules():
        module.train()
    for _ in range(local_epochs):
        for inputs, labels in _batches(train_loader, unpack, device):
            stats.steps += 1
            if split.client_head is None and not defended:
                activations = _call(split.client_half, inputs)
                reply = data_plane.exchange(stats.steps, activations.detach(), labels)
                optimizer.zero_grad(set_to_none=True)
                activations.backward(reply.cut_gradient.to(device))
                loss, correct = reply.loss, reply.correct
            else:
                loss, correct = _defended_step(
                    stats.steps,
                    inputs,
                    labels,
                    split=split,
                    data_plane=data_plane,
                    optimizer=optimizer,
                    loss_fn=loss_fn,
                    privacy=privacy if defended else None,
                    generator=generator,
                )
            _add_proximal_term(parameters, start_weights, proximal_mu)
            optimizer.step()
            stats.num_examples += len(labels)
            stats.loss_sum += loss * len(labels)
            stats.correct += correct
    stats.seconds = time.perf_counter() - started
    return stats


def run_local_loss_epochs(
    *,
    split: SplitModel,
    data_plane: LocalLossDataPlane,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    local_epochs: int = 1,
    send_every: int = 1,
    proximal_mu: float = 0.0,
    loss_fn: LossFn | None = None,
    privacy: PrivacyConfig | None = None,
    generator: torch.Generator | None = None,
    batch: Unpack | None = None,
) -> LocalLossStats:
    """Local-loss training: train the client's parts of ``split`` on their own loss, and
    stream activations and labels to the split server without waiting for it.

    For each batch: forward the client half, run ``split.aux_head`` on the activations, and
    step ``optimizer`` on ``loss_fn`` of its output and the labels; every ``send_every``-th
    batch also goes to the split server (activations detached, with the labels), whose answer
    is not waited for. No gradient comes back: the client's update depends on its own data and
    parts alone. At the end every batch sent is waited for, so the split server has trained on
    all of them when this returns. ``optimizer`` must hold
    :meth:`~splitfed.SplitModel.client_parameters` (the client half and the auxiliary head).

    Parameters
    ----------
    split : SplitModel
        The client's parts, with an auxiliary head (:meth:`~splitfed.SplitModel.with_aux_head`).
    data_plane : LocalLossDataPlane
        Where the batches go (:class:`~splitfed.GrpcDataPlane`, which bounds the batches in
        flight).
    train_loader : Iterable
        The client's batches.
    optimizer : torch.optim.Optimizer
        Steps the client half and the auxiliary head.
    local_epochs : int (default: 1)
        Passes over ``train_loader``.
    send_every : int (default: 1)
        Send every this many batches (CSE-FSL's ``k``); the others train the client alone.
    proximal_mu : float (default: 0.0)
        FedProx: the term ``mu/2 * ||w - w_start||^2`` is added to the client's loss.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The auxiliary head's loss, averaged over the batch; ``None`` means cross-entropy.
    privacy : PrivacyConfig | None (default: None)
        Smashed-data clipping and noise apply to what is sent (the auxiliary loss sees the
        clean activations, which never leave the client); NoPeek's penalty joins the
        auxiliary loss. Label protection does not apply (labels are sent).
    generator : torch.Generator | None (default: None)
        Draws the smashed-data noise.
    batch : BatchSpec | Callable | None (default: None)
        How to find the inputs and the labels in a batch (see :class:`BatchSpec`).
    """
    aux_head = split.aux_head
    if aux_head is None:
        raise ValueError(
            "local-loss training needs an auxiliary head on the client: pass "
            "split.with_aux_head(num_classes=...) (or with_aux_head(my_head)), built as the "
            "ServerApp builds it"
        )
    if local_epochs < 1 or send_every < 1:
        raise ValueError(
            f"local_epochs and send_every must be at least 1; got {local_epochs} and {send_every}"
        )
    device = _device(split)
    parameters = split.client_parameters()
    start_weights = [p.detach().clone() for p in parameters] if proximal_mu > 0 else []
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    nopeek_weight = privacy.nopeek_weight if privacy is not None else 0.0
    unpack = _unpacker(batch)
    stats = LocalLossStats()
    sent_sizes: dict[int, int] = {}
    started = time.perf_counter()
    for module in split.client_modules():
        module.train()
    for _ in range(local_epochs):
        for inputs, labels in _batches(train_loader, unpack, device):
            stats.steps += 1
            activations = _call(split.client_half, inputs)
            if stats.steps % send_every == 0:
                # Sent before the local backward pass, so that both sides compute at once.
                sent = (
                    activations
                    if privacy is None
                    else privacy.protect_smashed(activations, generator=generator)
                )
                stats.sent_batches += 1
                sent_sizes[stats.sent_batches] = len(labels)
                data_plane.send(stats.sent_batches, sent.detach(), labels)
            logits = aux_head(activations)
            targets = labels.to(logits.device)
            loss = loss_fn(logits, targets)
            objective = loss
            if nopeek_weight > 0 and len(labels) >= 4:
                flat_inputs = inputs if isinstance(inputs, torch.Tensor) else _first(inputs)
                objective = loss + nopeek_weight * distance_correlation(flat_inputs, activations)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            _add_proximal_term(parameters, start_weights, proximal_mu)
            optimizer.step()
            stats.num_examples += len(labels)
            stats.loss_sum += float(loss.detach()) * len(labels)
            stats.correct += _correct(logits, targets)
    for acknowledgement in data_plane.flush():
        examples = sent_sizes[acknowledgement.step]
        stats.server_examples += examples
        stats.server_loss_sum += acknowledgement.loss * examples
        stats.server_correct += acknowledgement.correct
    stats.seconds = time.perf_counter() - started
    return stats


def _add_proximal_term(
    parameters: Sequence[torch.Tensor], start_weights: Sequence[torch.Tensor], mu: float
) -> None:
    """FedProx: add the gradient of ``mu/2 * ||w - w_start||^2`` to each parameter's."""
    if mu <= 0:
        return
    for param, start in zip(parameters, start_weights, strict=True):
        if param.grad is not None:
            param.grad.add_(param.detach() - start, alpha=mu)


def _defended_step(
    step: int,
    inputs: ModelInput,
    labels: torch.Tensor,
    *,
    split: SplitModel,
    data_plane: DataPlane,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    privacy: PrivacyConfig | None,
    generator: torch.Generator | None,
) -> tuple[float, int]:
    """One batch of the label-private split and/or with defenses; leaves the gradients set."""
    activations = _call(split.client_half, inputs)
    sent = (
        activations
        if privacy is None
        else privacy.protect_smashed(activations, generator=generator)
    )
    if split.client_head is None:
        reply = data_plane.exchange(step, sent.detach(), labels)
        optimizer.zero_grad(set_to_none=True)
        cut_gradient, loss, correct = reply.cut_gradient, reply.loss, reply.correct
    else:
        outputs = data_plane.forward_server_half(step, sent.detach())
        outputs = outputs.to(sent.device).requires_grad_(True)
        logits = split.client_head(outputs)
        labels = labels.to(logits.device)
        head_loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        head_loss.backward()
        output_gradient = outputs.grad
        assert output_gradient is not None  # outputs is a leaf that requires grad
        if privacy is not None:
            output_gradient = privacy.protect_output_gradient(output_gradient, generator=generator)
        cut_gradient = data_plane.backward_server_half(step, output_gradient.detach())
        if cut_gradient.shape != sent.shape:
            raise SplitServerError(
                f"the gradient at the cut has shape {tuple(cut_gradient.shape)}, the activations "
                f"{tuple(sent.shape)}"
            )
        loss = float(head_loss.detach())
        correct = _correct(logits, labels)
    roots: list[torch.Tensor] = [sent]
    gradients: list[torch.Tensor | None] = [cut_gradient.to(sent.device)]
    if privacy is not None and privacy.nopeek_weight > 0 and len(labels) >= 4:
        flat_inputs = inputs if isinstance(inputs, torch.Tensor) else _first(inputs)
        roots.append(privacy.nopeek_weight * distance_correlation(flat_inputs, activations))
        gradients.append(None)
    torch.autograd.backward(roots, gradients)
    return loss, correct


def _first(inputs: ModelInput) -> torch.Tensor:
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return next(iter(values))  # type: ignore[no-any-return]


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Examples whose highest logit is their label (0 for outputs that are not class scores)."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.is_floating_point():
        return 0
    return int((logits.detach().argmax(dim=1) == labels).sum())


@torch.no_grad()
def evaluate_locally(
    *,
    split: SplitModel,
    data_plane: DataPlane,
    loader: Iterable[Any],
    loss_fn: LossFn | None = None,
    batch: Unpack | None = None,
) -> EvaluateStats:
    """Evaluate the client's parts of ``split`` with the split server's half, in eval mode.

    Nothing is trained: the client parts run in eval mode without gradients, and the split server
    runs its half the same way. In the label-private split the labels and the loss stay here.
    """
    device = _device(split)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    unpack = _unpacker(batch)
    stats = EvaluateStats()
    with modes_kept(*split.client_modules(), training=False):
        for step, (inputs, labels) in enumerate(_batches(loader, unpack, device), start=1):
            activations = _call(split.client_half, inputs)
            if split.client_head is None:
                reply = data_plane.evaluate(step, activations, labels)
                loss, correct = reply.loss, reply.correct
            else:
                logits = split.client_head(data_plane.forward_server_half(step, activations))
                labels = labels.to(logits.device)
                loss, correct = float(loss_fn(logits, labels)), _correct(logits, labels)
            stats.num_examples += len(labels)
            stats.loss_sum += loss * len(labels)
            stats.correct += correct
    return stats
