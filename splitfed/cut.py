"""Cutting a model into a client half and a server half, checked on a sample batch."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .wire import WireFormatError, wire_dtype_name

__all__ = [
    "CLIENT_HEAD_PREFIX",
    "CutError",
    "LabelPrivateSplit",
    "SplitModel",
    "client_state_dict",
    "join_halves",
    "load_client_state_dict",
    "split_label_private",
    "split_model",
]


class CutError(ValueError):
    """A model cannot be cut where asked, or two halves do not connect."""


@dataclass(frozen=True)
class SplitModel:
    """A model cut in two at the cut layer.

    Build it with :func:`split_model` or :func:`join_halves`, which check that the halves connect.

    Attributes
    ----------
    client_half : nn.Module
        The lower layers, run by each client on its own data.
    server_half : nn.Module
        The upper layers, run by the split server on the client half's output.
    activation_shape : tuple[int, ...]
        Shape of one example's cut-layer activations (the smashed data), without the batch
        dimension. The split server refuses batches of any other shape.
    activation_dtype : torch.dtype
        Dtype of the cut-layer activations.
    """

    client_half: nn.Module
    server_half: nn.Module
    activation_shape: tuple[int, ...]
    activation_dtype: torch.dtype

    def full_model(self) -> nn.Sequential:
        """Return the unsplit model: the client half followed by the server half.

        The returned module shares parameters with the halves.
        """
        return nn.Sequential(self.client_half, self.server_half)


def split_model(model: nn.Sequential, *, cut: int | str, sample_input: torch.Tensor) -> SplitModel:
    """Cut ``model`` into a client half and a server half.

    Parameters
    ----------
    model : nn.Sequential
        The unsplit model. It is copied: the halves do not share parameters with it.
    cut : int | str
        Where to cut. An ``int`` k puts the first k children on the client; a ``str`` names the
        last child that stays on the client (``cut="pool"`` cuts right after the child ``pool``).
        A string of digits (as run configs pass it) is read as the int it spells.
    sample_input : torch.Tensor
        A batch of inputs (batch dimension first), used to check that the halves connect and to
        record the shape of the cut-layer activations.

    Raises
    ------
    CutError
        If ``model`` is not an ``nn.Sequential``, the cut lies outside it, or the halves do not
        connect on ``sample_input``. The message says what to change.
    """
    if not isinstance(model, nn.Sequential):
        raise CutError(
            f"cannot cut a {type(model).__name__}: only nn.Sequential has an order of layers to "
            "cut. Wrap the layers in nn.Sequential, or build the two halves yourself and pass "
            "them to join_halves(client_half=..., server_half=..., sample_input=...)"
        )
    names = [name for name, _ in model.named_children()]
    index = _cut_index(names, cut)
    # Keep the children's names, so state-dict keys read like the original model's.
    children = list(copy.deepcopy(model).named_children())
    client_half = nn.Sequential(OrderedDict(children[:index]))
    server_half = nn.Sequential(OrderedDict(children[index:]))
    return join_halves(client_half=client_half, server_half=server_half, sample_input=sample_input)


def join_halves(
    *, client_half: nn.Module, server_half: nn.Module, sample_input: torch.Tensor
) -> SplitModel:
    """Check that ``server_half`` accepts what ``client_half`` outputs, and pair them.

    Use this for models that are not an ``nn.Sequential``: write the two halves as modules of
    their own. The check runs one forward pass of ``sample_input`` in eval mode, without gradients,
    so BatchNorm statistics are not touched.

    Raises
    ------
    CutError
        If the client half fails on ``sample_input``, does not return a single tensor with a batch
        dimension, or the server half fails on its output.
    """
    if not isinstance(sample_input, torch.Tensor) or sample_input.dim() < 1:
        raise CutError(
            "sample_input must be a tensor with a batch dimension first, e.g. "
            "next(iter(train_loader))[0]"
        )
    modes = (client_half.training, server_half.training)
    client_half.eval()
    server_half.eval()
    try:
        with torch.no_grad():
            try:
                activations = client_half(sample_input)
            except Exception as err:
                raise CutError(
                    f"the client half fails on sample_input of shape {tuple(sample_input.shape)}: "
                    f"{err}. Check that sample_input is a batch of the model's inputs"
                ) from err
            if not isinstance(activations, torch.Tensor):
                raise CutError(
                    f"the client half returns a {type(activations).__name__}, but the data plane "
                    "carries one tensor per batch; cut where the model passes a single tensor"
                )
            if activations.dim() < 1 or activations.shape[0] != sample_input.shape[0]:
                raise CutError(
                    f"the client half maps a batch of {sample_input.shape[0]} to shape "
                    f"{tuple(activations.shape)}; the cut must keep the batch dimension first"
                )
            try:
                wire_dtype_name(activations.dtype)
            except WireFormatError as err:
                raise CutError(str(err)) from err
            try:
                server_half(activations)
            except Exception as err:
                raise CutError(
                    f"the halves do not connect: the client half outputs shape "
                    f"{tuple(activations.shape)}, and the server half fails on it: {err}. "
                    "Move the cut, or change the server half's first layer to accept that shape"
                ) from err
    finally:
        client_half.train(modes[0])
        server_half.train(modes[1])
    return SplitModel(
        client_half=client_half,
        server_half=server_half,
        activation_shape=tuple(activations.shape[1:]),
        activation_dtype=activations.dtype,
    )


def _cut_index(names: list[str], cut: int | str) -> int:
    """Return how many children go to the client for ``cut``."""
    layers = ", ".join(f"{i}:{name}" for i, name in enumerate(names))
    if isinstance(cut, bool) or not isinstance(cut, int | str):
        raise CutError(f"cut must be an int or a child's name, got {type(cut).__name__}")
    if isinstance(cut, str):
        if cut.lstrip("-").isdigit():
            cut = int(cut)
        elif cut in names:
            cut = names.index(cut) + 1
        else:
            raise CutError(f"the model has no child named {cut!r}; its children are [{layers}]")
    if not 1 <= cut <= len(names) - 1:
        raise CutError(
            f"cut={cut} is outside the model: with {len(names)} children, cut must be between 1 "
            f"and {len(names) - 1} so that each half keeps at least one layer. "
            f"Children: [{layers}]"
        )
    return cut


CLIENT_HEAD_PREFIX = "client-head."
"""Prefix of the client head's keys in the client's ``ArrayRecord`` (label-private split)."""


@dataclass(frozen=True)
class LabelPrivateSplit:
    """A model cut in three for the label-private (U-shaped) split: labels never leave the client.

    The client runs the lower layers (the client half) and the top layers with the loss (the
    client head); the split server runs the layers in between (the server half). Per batch, the
    client sends the cut-layer activations, the server answers with its output, the client sends
    back the gradient of its loss at that output, and the server answers with the gradient at
    the cut. Build it with :func:`split_label_private`.

    Attributes
    ----------
    client_half : nn.Module
        The lower layers, on the client.
    server_half : nn.Module
        The middle layers, on the split server.
    client_head : nn.Module
        The top layers, on the client; the loss is computed on its output.
    activation_shape, activation_dtype
        One example's cut-layer activations (what the client sends), as in :class:`SplitModel`.
    output_shape, output_dtype
        One example's server-half output (what the server sends back).
    """

    client_half: nn.Module
    server_half: nn.Module
    client_head: nn.Module
    activation_shape: tuple[int, ...]
    activation_dtype: torch.dtype
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype

    def full_model(self) -> nn.Sequential:
        """The unsplit model (client half, server half, client head), sharing their parameters."""
        return nn.Sequential(self.client_half, self.server_half, self.client_head)

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        """What the client sends to be merged: the client half and the client head, in one dict.

        The head's keys carry :data:`CLIENT_HEAD_PREFIX`, so FedAvg merges both parts like any
        other arrays.
        """
        return client_state_dict(self.client_half, self.client_head)


def client_state_dict(client_half: nn.Module, client_head: nn.Module) -> dict[str, torch.Tensor]:
    """The client half's state and the client head's (keys prefixed), as one dict."""
    state = dict(client_half.state_dict())
    for key, value in client_head.state_dict().items():
        state[CLIENT_HEAD_PREFIX + key] = value
    return state


def load_client_state_dict(
    client_half: nn.Module, client_head: nn.Module, state: dict[str, torch.Tensor]
) -> None:
    """Load a dict made by :func:`client_state_dict` into the two modules."""
    head = {
        k.removeprefix(CLIENT_HEAD_PREFIX): v
        for k, v in state.items()
        if k.startswith(CLIENT_HEAD_PREFIX)
    }
    half = {k: v for k, v in state.items() if not k.startswith(CLIENT_HEAD_PREFIX)}
    client_half.load_state_dict(half)
    client_head.load_state_dict(head)


def split_label_private(
    model: nn.Sequential, *, cut: int | str, server_cut: int | str, sample_input: torch.Tensor
) -> LabelPrivateSplit:
    """Cut ``model`` in three: client half, server half, client head.

    Parameters
    ----------
    model : nn.Sequential
        The unsplit model; it is copied.
    cut : int | str
        The end of the client half, as in :func:`split_model`: an ``int`` k puts the first k
        children on the client, a name is the last child of the client half.
    server_cut : int | str
        The end of the server half, the same way: an ``int`` k means the first k children are
        the client half and the server half together; a name is the last child on the server.
        The children after it form the client head, which must keep at least one layer.
    sample_input : torch.Tensor
        A batch of inputs, used to check that the three parts connect and to record shapes.

    Raises
    ------
    CutError
        If the cuts lie outside the model, are out of order, or the parts do not connect.
    """
    if not isinstance(model, nn.Sequential):
        raise CutError(
            f"cannot cut a {type(model).__name__}: only nn.Sequential has an order of layers to "
            "cut. Wrap the layers in nn.Sequential"
        )
    names = [name for name, _ in model.named_children()]
    first = _cut_index(names, cut)
    second = _cut_index(names, server_cut)
    if second <= first:
        layers = ", ".join(f"{i}:{name}" for i, name in enumerate(names))
        raise CutError(
            f"server_cut={server_cut!r} must come after cut={cut!r}, so that the server half keeps "
            f"at least one layer. Children: [{layers}]"
        )
    children = list(copy.deepcopy(model).named_children())
    client_half = nn.Sequential(OrderedDict(children[:first]))
    server_half = nn.Sequential(OrderedDict(children[first:second]))
    client_head = nn.Sequential(OrderedDict(children[second:]))
    lower = join_halves(client_half=client_half, server_half=server_half, sample_input=sample_input)
    modes = (client_half.training, server_half.training)
    client_half.eval()
    server_half.eval()
    try:
        with torch.no_grad():
            middle_input = client_half(sample_input)
        upper = join_halves(
            client_half=server_half, server_half=client_head, sample_input=middle_input
        )
    finally:
        client_half.train(modes[0])
        server_half.train(modes[1])
    return LabelPrivateSplit(
        client_half=client_half,
        server_half=server_half,
        client_head=client_head,
        activation_shape=lower.activation_shape,
        activation_dtype=lower.activation_dtype,
        output_shape=upper.activation_shape,
        output_dtype=upper.activation_dtype,
    )
