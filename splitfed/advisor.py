"""What each cut costs the client: parameters, compute, memory and data-plane bytes.

:func:`cut_costs` answers, for every place a model can be cut, how much of the model a client
holds and trains, how many FLOPs it spends per training sample, how much memory one training
step takes, and how many bytes cross the data plane per sample, beside a row for the whole model
on the client (plain FedAvg). Everything is computed from one forward and backward pass on the
sample batch: nothing is trained, and the model's weights, buffers and gradients are left as they
were.

How each figure is counted:

- **parameters**: elements of the parameters each piece holds (shared parameters counted once);
- **FLOPs per sample**: ``torch.utils.flop_counter.FlopCounterMode`` over a forward pass and a
  backward pass from the gradient at the piece's output, divided by the sample batch's size. It
  counts matrix multiplications and convolutions (2 FLOPs per multiply-add) and not elementwise
  operations, normalisation or pooling. The client's backward computes weight gradients and,
  where an earlier layer needs it, input gradients; no gradient is computed for the data
  itself, so the first layer's backward costs about one forward and later layers' about two.
  The server's backward also computes the gradient at the cut, which it sends back;
- **memory** of a training step with ``batch_size`` samples: the client's parameters and
  buffers, one gradient per trainable parameter, ``optimizer_states`` more tensors of its size
  (1 for SGD with momentum, 2 for Adam), and the activations: every tensor autograd saves for
  the backward pass and the piece's output (the cut activations, which wait for their gradient),
  each storage counted once and parameters excluded, plus the gradient that comes back for the
  output; measured on the sample batch and scaled linearly to ``batch_size``. Allocator overhead
  and temporaries freed during the pass are not counted;
- **bytes per sample**: the cut activations sent up and their gradient sent down, each
  ``numel * itemsize`` of one sample's activations, before any wire compression and without the
  labels (one integer per sample in the plain split) or framing. These are the plain split's
  (SFLV1, SFLV2): local-loss training receives no gradient, and the label-private split also
  exchanges the server half's outputs and their gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._state import modes_kept
from .graph import CutError, cut_graph, cut_points

__all__ = ["WHOLE_MODEL", "CutCost", "cut_costs"]

WHOLE_MODEL = "whole model"
"""How :meth:`CutCost.label` names the row without a cut: the whole model on the client."""


@dataclass(frozen=True)
class CutCost:
    """What one cut costs the client and the server, per training sample and per step.

    Attributes
    ----------
    cut : str | None
        The module after whose call the model is cut; ``None`` for the whole model on the client
        (plain FedAvg: no server half and no per-batch traffic).
    activation_shape : tuple[int, ...] | None
        One sample's cut-layer activations, without the batch dimension (``None``: no cut).
    activation_dtype : torch.dtype | None
        Their dtype (``None``: no cut).
    client_parameters, server_parameters : int
        Parameter elements of the client half and of the server half.
    client_flops, server_flops : int
        FLOPs per training sample, forward and backward, of each half.
    client_memory_bytes : int
        The client's memory for one training step of ``batch_size`` samples: parameters and
        buffers, gradients, optimizer state and activations.
    client_activation_bytes : int
        The activations' share of ``client_memory_bytes``.
    client_state_bytes : int
        Bytes of the client's state (parameters and buffers): what travels to and from the
        aggregator each round.
    bytes_up_per_sample, bytes_down_per_sample : int
        Bytes of one sample's cut activations (client to server) and of their gradient (server to
        client) in the plain split (SFLV1, SFLV2); 0 without a cut. Local-loss training sends no
        gradient back; the label-private split adds the server half's outputs and their
        gradient.
    batch_size : int
        The batch size ``client_memory_bytes`` is counted for.
    """

    cut: str | None
    activation_shape: tuple[int, ...] | None
    activation_dtype: torch.dtype | None
    client_parameters: int
    server_parameters: int
    client_flops: int
    server_flops: int
    client_memory_bytes: int
    client_activation_bytes: int
    client_state_bytes: int
    bytes_up_per_sample: int
    bytes_down_per_sample: int
    batch_size: int

    @property
    def label(self) -> str:
        """The cut's name, or :data:`WHOLE_MODEL`."""
        return WHOLE_MODEL if self.cut is None else self.cut

    @property
    def client_share(self) -> float:
        """The client's share of the model's parameters."""
        total = self.client_parameters + self.server_parameters
        return self.client_parameters / total if total else 0.0

    @property
    def client_flops_share(self) -> float:
        """The client's share of the FLOPs of a training step."""
        total = self.client_flops + self.server_flops
        return self.client_flops / total if total else 0.0

    @property
    def bytes_per_sample(self) -> int:
        """Data-plane bytes per training sample, both ways."""
        return self.bytes_up_per_sample + self.bytes_down_per_sample

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-friendly values (the dtype as its name, e.g. ``"float32"``)."""
        return {
            "cut": self.label,
            "activation_shape": (
                None if self.activation_shape is None else list(self.activation_shape)
            ),
            "activation_dtype": _dtype_name(self.activation_dtype),
            "client_parameters": self.client_parameters,
            "server_parameters": self.server_parameters,
            "client_share": self.client_share,
            "client_flops": self.client_flops,
            "server_flops": self.server_flops,
            "client_flops_share": self.client_flops_share,
            "client_memory_bytes": self.client_memory_bytes,
            "client_activation_bytes": self.client_activation_bytes,
            "client_state_bytes": self.client_state_bytes,
            "bytes_up_per_sample": self.bytes_up_per_sample,
            "bytes_down_per_sample": self.bytes_down_per_sample,
            "bytes_per_sample": self.bytes_per_sample,
            "batch_size": self.batch_size,
        }


def cut_costs(
    model: nn.Module,
    *,
    sample_input: Any,
    cuts: Sequence[str] | None = None,
    batch_size: int = 32,
    optimizer_states: int = 1,
    whole_model: bool = True,
) -> list[CutCost]:
    """What each cut of ``model`` costs the client, computed without training.

    Parameters
    ----------
    model : nn.Module
        Any model :func:`splitfed.cut_points` accepts (``nn.Sequential`` or not). Its weights,
        buffers (e.g. BatchNorm statistics), gradients and train/eval mode are left unchanged.
    sample_input : Any
        The model's inputs, batch dimension first, as for :func:`splitfed.split_model`: a tensor,
        a tuple of positional arguments or a dict of keyword arguments. FLOPs and activation
        memory are measured on it, so its values only matter where the model branches on them.
    cuts : Sequence[str] | None (default: None)
        Module names to cut after; ``None`` takes every valid cut point of the model.
    batch_size : int (default: 32)
        The training batch size the client's memory is counted for.
    optimizer_states : int (default: 1)
        Tensors of each trainable parameter's size the client's optimizer keeps: 0 for plain SGD,
        1 for SGD with momentum, 2 for Adam.
    whole_model : bool (default: True)
        Add a last row for the whole model on the client (``cut=None``).

    Returns
    -------
    list[CutCost]
        One row per cut, in forward order, then the whole model's row.

    Raises
    ------
    CutError
        If a name in ``cuts`` is not a module of the model, or the model cannot be cut there; the
        message lists the valid cuts. Also if ``torch.fx`` cannot trace the model.
    ValueError
        If ``batch_size`` is below 1, ``optimizer_states`` below 0, or ``sample_input`` holds no
        tensor with a batch dimension.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: count memory for a batch of at least 1")
    if optimizer_states < 0:
        raise ValueError(
            f"optimizer_states={optimizer_states}: use 0 (plain SGD), 1 (SGD with momentum) or "
            "2 (Adam)"
        )
    sample_size = _sample_size(sample_input)
    if sample_size < 2:
        raise ValueError(
            "sample_input holds one sample; pass at least 2 (batch statistics, e.g. BatchNorm's, "
            "need more than one)"
        )
    points = cut_points(model, sample_input=sample_input)
    valid = [point for point in points if point.valid]
    if cuts is None:
        names = [point.name for point in valid]
    else:
        names = list(cuts)
        by_name = {point.name: point for point in points}
        listing = ", ".join(point.name for point in valid) or "none"
        for name in names:
            point = by_name.get(name)
            if point is None:
                raise CutError(
                    f"cut {name!r} is not a module that the model's forward calls exactly once; "
                    f"the valid cuts are: {listing}"
                )
            if not point.valid:
                raise CutError(f"cannot cut after {name!r}: {point.problem}. Valid cuts: {listing}")
    rows = []
    with _preserved(model):
        whole = _training_cost(model, _arguments(sample_input), input_grad=False)
        for name in names:
            client, server = cut_graph(model, cuts=[name], sample_input=sample_input)
            client.train()
            server.train()
            crossing = client.output_crossing
            assert crossing is not None  # every piece but the last has one
            client_cost = _training_cost(client, _arguments(sample_input), input_grad=False)
            activations = client_cost.output.detach()
            server_cost = _training_cost(server, ((activations,), {}), input_grad=True)
            cut_bytes = math.prod(crossing.shape) * _itemsize(crossing.dtype)
            activation_bytes = _scaled(client_cost.activation_bytes, sample_size, batch_size)
            rows.append(
                CutCost(
                    cut=name,
                    activation_shape=crossing.shape,
                    activation_dtype=crossing.dtype,
                    client_parameters=_parameter_count(client),
                    server_parameters=_parameter_count(server),
                    client_flops=_per_sample(client_cost.flops, sample_size),
                    server_flops=_per_sample(server_cost.flops, sample_size),
                    client_memory_bytes=_model_state_memory(client, optimizer_states)
                    + activation_bytes,
                    client_activation_bytes=activation_bytes,
                    client_state_bytes=_state_bytes(client),
                    bytes_up_per_sample=cut_bytes,
                    bytes_down_per_sample=cut_bytes,
                    batch_size=batch_size,
                )
            )
    if whole_model:
        activation_bytes = _scaled(whole.activation_bytes, sample_size, batch_size)
        rows.append(
            CutCost(
                cut=None,
                activation_shape=None,
                activation_dtype=None,
                client_parameters=_parameter_count(model),
                server_parameters=0,
                client_flops=_per_sample(whole.flops, sample_size),
                server_flops=0,
                client_memory_bytes=_model_state_memory(model, optimizer_states) + activation_bytes,
                client_activation_bytes=activation_bytes,
                client_state_bytes=_state_bytes(model),
                bytes_up_per_sample=0,
                bytes_down_per_sample=0,
                batch_size=batch_size,
            )
        )
    return rows


@dataclass(frozen=True)
class _StepCost:
    flops: int
    activation_bytes: int
    output: Any


def _training_cost(
    module: nn.Module, arguments: tuple[tuple[Any, ...], dict[str, Any]], *, input_grad: bool
) -> _StepCost:
    """FLOPs of one forward and backward pass of ``module``, and the bytes of its activations:
    what autograd saves and the output (each storage once), and the output's gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = arguments
    if input_grad:
        # The server computes the gradient at the cut to send it back.
        args = tuple(a.detach().requires_grad_(True) for a in args)
    parameter_storages = {p.untyped_storage().data_ptr() for p in _unique_parameters(module)}
    # Per storage, the byte range the saved tensors use: views of one storage count once, and a
    # sample batch sliced from a larger tensor counts its own bytes, not the whole tensor's.
    extents: dict[int, tuple[int, int]] = {}

    def record(tensor: torch.Tensor) -> None:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in parameter_storages:
            return
        size = tensor.element_size()
        start = int(tensor.storage_offset()) * size
        span = sum(
            (int(n) - 1) * abs(step) for n, step in zip(tensor.shape, tensor.stride(), strict=True)
        )
        end = start + size * (1 + span) if tensor.numel() else start
        low, high = extents.get(pointer, (start, end))
        extents[pointer] = (min(low, start), max(high, end))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record(tensor)
        return tensor

    # backward(), not autograd.grad(): FlopCounterMode's module hooks refuse the latter. The
    # gradients it leaves are put back as they were.
    with (
        _grads_kept(module),
        FlopCounterMode(display=False) as counter,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        output = module(*args, **kwargs)
        outputs = [
            leaf
            for leaf in pytree.tree_leaves(output)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
        ]
        for leaf in outputs:
            # The output waits for its gradient (from the server, or the loss).
            record(leaf)
        gradients = [torch.ones_like(leaf) for leaf in outputs]
        if outputs:
            torch.autograd.backward(outputs, gradients)
    activation_bytes = sum(high - low for low, high in extents.values()) + sum(
        g.numel() * g.element_size() for g in gradients
    )
    return _StepCost(int(counter.get_total_flops()), activation_bytes, output)


@contextlib.contextmanager
def _grads_kept(module: nn.Module) -> Iterator[None]:
    """Put back every parameter's ``.grad`` as it was before the block."""
    grads = [(p, p.grad) for p in _unique_parameters(module)]
    for p, _ in grads:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in grads:
            p.grad = grad


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Run passes in train mode and put back the model's modes and buffers afterwards (a
    BatchNorm in train mode updates its running statistics), and the CPU random state."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        # Dropout draws from a forked generator: the caller's random state is left alone.
        with modes_kept(model, training=True), torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _arguments(sample_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(sample_input, Mapping):
        return (), dict(sample_input)
    if isinstance(sample_input, tuple):
        return sample_input, {}
    return (sample_input,), {}


def _sample_size(sample_input: Any) -> int:
    for leaf in pytree.tree_leaves(sample_input):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] > 0:
            return int(leaf.shape[0])
    raise ValueError(
        "sample_input holds no tensor with a batch dimension: pass a batch of the model's "
        "inputs, batch dimension first (e.g. torch.zeros(2, 1, 8, 8))"
    )


def _unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())  # parameters() yields each shared parameter once


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in _unique_parameters(module))


def _state_bytes(module: nn.Module) -> int:
    parameters = sum(p.numel() * p.element_size() for p in _unique_parameters(module))
    return parameters + sum(b.numel() * b.element_size() for b in module.buffers())


def _model_state_memory(module: nn.Module, optimizer_states: int) -> int:
    """Parameters and buffers, a gradient per trainable parameter, and the optimizer's state."""
    trainable = sum(
        p.numel() * p.element_size() for p in _unique_parameters(module) if p.requires_grad
    )
    return _state_bytes(module) + (1 + optimizer_states) * trainable


def _per_sample(total: int, sample_size: int) -> int:
    return round(total / sample_size)


def _scaled(total: int, sample_size: int, batch_size: int) -> int:
    return round(total * batch_size / sample_size)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
