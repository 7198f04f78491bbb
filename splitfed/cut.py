"""Cutting a model into the parts SplitFed trains, checked on a sample batch.

A :class:`SplitModel` is one abstraction for both kinds of split: the plain split (a client half
and a server half) and the label-private, U-shaped split (a client half, a server half and a
client head that keeps the labels and the loss on the client). Whatever the kind, it answers the
same questions: what the client trains (:meth:`SplitModel.client_parameters`), its state
(:meth:`SplitModel.client_state_dict`, :meth:`SplitModel.load_client_state_dict`), what travels on
the data plane (:attr:`SplitModel.activation_shape`, :attr:`SplitModel.output_shape`) and the
unsplit model (:meth:`SplitModel.full_model`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .graph import CutError, CutPoint, cut_graph, cut_points, materialize
from .wire import WireFormatError, wire_dtype_name

__all__ = [
    "CutError",
    "CutPoint",
    "ModelInput",
    "SplitModel",
    "cut_points",
    "join_halves",
    "materialize",
    "split_model",
]

ModelInput = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]
"""What a model's ``forward`` takes: one tensor, a tuple of positional arguments, or a dict of
keyword arguments."""


@dataclass(frozen=True)
class SplitModel:
    """A model cut for SplitFed: a client half, a server half, and optionally a client head.

    Build it with :func:`split_model` (cut a model by a module's name) or :func:`join_halves`
    (parts written by hand); both check that the parts connect on a sample batch.

    Attributes
    ----------
    client_half : nn.Module
        The lower layers, run by each client on its own data.
    server_half : nn.Module
        The layers the split server runs on the client half's output.
    activation_shape : tuple[int, ...]
        One example's cut-layer activations (the smashed data) without the batch dimension: what
        a client sends. The split server refuses any other shape.
    activation_dtype : torch.dtype
        Dtype of the cut-layer activations.
    client_head : nn.Module | None (default: None)
        The label-private (U-shaped) split: the top layers, run on the client on the server
        half's output, where the loss is computed, so that labels never leave the client.
    output_shape, output_dtype : tuple[int, ...] | None, torch.dtype | None (default: None)
        The label-private split: one example of the server half's output (what the split server
        sends back).
    model : nn.Module | None (default: None)
        The whole model the parts were cut from, sharing their parameters (:func:`split_model`);
        ``None`` for parts joined by hand.
    """

    client_half: nn.Module
    server_half: nn.Module
    activation_shape: tuple[int, ...]
    activation_dtype: torch.dtype
    client_head: nn.Module | None = None
    output_shape: tuple[int, ...] | None = None
    output_dtype: torch.dtype | None = None
    model: nn.Module | None = None

    @property
    def label_private(self) -> bool:
        """Whether labels and the loss stay on the client (a client head exists)."""
        return self.client_head is not None

    def client_modules(self) -> list[nn.Module]:
        """What each client trains: the client half, then the client head if there is one."""
        return [self.client_half] + ([self.client_head] if self.client_head is not None else [])

    def client_parameters(self) -> list[nn.Parameter]:
        """The parameters a client's optimizer updates."""
        return [p for module in self.client_modules() for p in module.parameters()]

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        """What a client sends to be merged: the client half's state and the client head's.

        The keys are the modules' own (for a model cut by :func:`split_model`, the original
        model's), so FedAvg merges every part like any other arrays.
        """
        state: dict[str, torch.Tensor] = {}
        for module in self.client_modules():
            state.update(module.state_dict())
        return state

    def load_client_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`client_state_dict` made (or the merged arrays of every client)."""
        expected = set(self.client_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise CutError(
                f"the state does not fit this split's client side: missing keys {missing}, "
                f"unexpected keys {unexpected}. Clients and the server must cut the same model "
                "at the same place"
            )
        for module in self.client_modules():
            own = module.state_dict()
            mismatched = [
                f"{key} {tuple(state[key].shape)} into {tuple(value.shape)}"
                for key, value in own.items()
                if tuple(state[key].shape) != tuple(value.shape)
            ]
            if mismatched:
                raise CutError(
                    f"the state does not fit this split's client side: {', '.join(mismatched)}. "
                    "Clients and the server must build the same model and cut it at the same place"
                )
            module.load_state_dict({key: state[key] for key in own})

    def materialize_client(self, *, device: str | torch.device = "cpu") -> SplitModel:
        """The client's side of a model built on the ``meta`` device: its parts get real storage
        on ``device``, the server half stays where it is and costs no memory.

        A client never runs the server half, so it need not hold it: build the model under
        ``with torch.device("meta"):``, cut it, and materialise only the client's parts. Their
        values are uninitialised until the strategy's message is loaded into them, which
        :func:`splitfed.train_client_half` does first.
        """
        half = materialize(self.client_half, device=device)
        head = materialize(self.client_head, device=device) if self.client_head else None
        return dataclasses.replace(self, client_half=half, client_head=head, model=None)

    def client_copy(self) -> SplitModel:
        """A copy with its own client parts (the server half is shared, not copied): one per
        client when several clients are simulated in one process."""
        half, head = copy.deepcopy((self.client_half, self.client_head))
        return dataclasses.replace(self, client_half=half, client_head=head, model=None)

    def full_model(self) -> nn.Module:
        """The unsplit model, sharing the parts' parameters.

        For a model cut by :func:`split_model`, the model itself (its own ``state_dict()``
        keys); for parts joined by hand, the parts run one after another.
        """
        if self.model is not None:
            return self.model
        return JoinedModel([self.client_half, self.server_half, *self.client_modules()[1:]])


class JoinedModel(nn.Module):
    """Parts written by hand, run one after another as the unsplit model."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        for name, part in zip(("client_half", "server_half", "client_head"), parts, strict=False):
            self.add_module(name, part)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first, *rest = self.children()
        outputs = first(*args, **kwargs)
        for part in rest:
            outputs = part(outputs)
        return outputs


def split_model(
    model: nn.Module,
    *,
    cut: int | str,
    sample_input: ModelInput,
    server_cut: int | str | None = None,
) -> SplitModel:
    """Cut ``model`` where a module's output is the only tensor that crosses.

    Parameters
    ----------
    model : nn.Module
        The unsplit model. It is copied: the parts do not share parameters with it.
    cut : int | str
        Where the client half ends: the name of a module (as in ``model.named_modules()``, e.g.
        ``"layer1"``); everything ``forward()`` computes up to and including that module's call
        runs on the client. For an ``nn.Sequential`` an ``int`` k puts its first k children on the
        client; a string of digits (as run configs pass it) is read as that int.
    sample_input : Tensor | tuple | dict
        A batch of inputs (batch dimension first), as ``model`` takes them: used to check that
        the parts connect and to record what crosses each cut.
    server_cut : int | str | None (default: None)
        The label-private (U-shaped) split: where the server half ends, named the same way. The
        layers after it form the client head, which computes the loss on the client.

    Raises
    ------
    CutError
        If a cut names no module, lies outside the model, the cuts are out of order, or the parts
        do not connect on ``sample_input``. The message says what to change.
    """
    cuts: list[int | str] = [cut] if server_cut is None else [cut, server_cut]
    if isinstance(model, nn.Sequential):
        names = _sequential_cut_names(model, cuts)
    elif all(isinstance(name, str) for name in cuts):
        names = [str(name) for name in cuts]
    else:
        raise CutError(
            f"a {type(model).__name__} is cut by module names (as in model.named_modules()); "
            f"got {cuts!r}. Numbers name positions of an nn.Sequential's children only. "
            "splitfed.cut_points(model, sample_input=...) lists where it can be cut"
        )
    model = copy.deepcopy(model)
    pieces = cut_graph(model, cuts=names, sample_input=sample_input)
    crossings = []
    for piece in pieces[:-1]:
        crossing = piece.output_crossing
        assert crossing is not None  # every piece but the last returns one tensor
        try:
            wire_dtype_name(crossing.dtype)
        except WireFormatError as err:
            raise CutError(f"{crossing.source} cannot cross the data plane: {err}") from err
        crossings.append(crossing)
    head = pieces[2] if len(pieces) == 3 else None
    split = SplitModel(
        client_half=pieces[0],
        server_half=pieces[1],
        activation_shape=tuple(crossings[0].shape),
        activation_dtype=crossings[0].dtype,
        client_head=head,
        output_shape=tuple(crossings[1].shape) if head is not None else None,
        output_dtype=crossings[1].dtype if head is not None else None,
        model=model,
    )
    _check_disjoint_client_keys(split)
    return split


def _sequential_cut_names(model: nn.Sequential, cuts: list[int | str]) -> list[str]:
    """The children's names a Sequential's cuts (positions or names) end at, in order."""
    names = [name for name, _ in model.named_children()]
    positions = [_cut_index(names, cut) for cut in cuts]
    if len(positions) == 2 and positions[1] <= positions[0]:
        layers = ", ".join(f"{i}:{name}" for i, name in enumerate(names))
        raise CutError(
            f"server_cut={cuts[1]!r} must come after cut={cuts[0]!r}, so that the server half "
            f"keeps at least one layer. Children: [{layers}]"
        )
    return [names[position - 1] for position in positions]


def join_halves(
    *,
    client_half: nn.Module,
    server_half: nn.Module,
    sample_input: ModelInput,
    client_head: nn.Module | None = None,
) -> SplitModel:
    """Check that parts written by hand connect, and pair them into a :class:`SplitModel`.

    Use it for models :func:`split_model` cannot cut: write the client half, the server half
    and, for the label-private split, the client head as modules of your own. The check runs one
    forward pass of ``sample_input`` in eval mode, without gradients, so BatchNorm statistics
    are not touched.

    Raises
    ------
    CutError
        If a part fails on what the part before returns, a part between two others does not
        return a single tensor with the batch dimension first, or two parts' state keys collide.
    """
    parts = [client_half, server_half] + ([client_head] if client_head is not None else [])
    return _connect(parts, sample_input, model=None)


def _connect(
    parts: Sequence[nn.Module], sample_input: ModelInput, *, model: nn.Module | None
) -> SplitModel:
    """Run ``sample_input`` through ``parts`` (eval mode, no gradients) and record what crosses."""
    client_half, server_half, *head = parts
    client_head = head[0] if head else None
    batch = _batch_size(sample_input)
    with _eval_mode(parts), torch.no_grad():
        try:
            activations = _call(client_half, sample_input)
        except Exception as err:
            raise CutError(
                f"the client half fails on sample_input of {_describe(sample_input)}: {err}. "
                "Check that sample_input is a batch of the model's inputs"
            ) from err
        _check_crossing(activations, batch, "the client half")
        try:
            outputs = server_half(activations)
        except Exception as err:
            raise CutError(
                f"the parts do not connect: the client half outputs shape "
                f"{tuple(activations.shape)}, and the server half fails on it: {err}. Move the "
                "cut, or make the server half's first layer accept that shape"
            ) from err
        if client_head is not None:
            _check_crossing(outputs, batch, "the server half")
            try:
                client_head(outputs)
            except Exception as err:
                raise CutError(
                    f"the parts do not connect: the server half outputs shape "
                    f"{tuple(outputs.shape)}, and the client head fails on it: {err}. Move "
                    "server_cut, or make the client head's first layer accept that shape"
                ) from err
    split = SplitModel(
        client_half=client_half,
        server_half=server_half,
        activation_shape=tuple(activations.shape[1:]),
        activation_dtype=activations.dtype,
        client_head=client_head,
        output_shape=tuple(outputs.shape[1:]) if client_head is not None else None,
        output_dtype=outputs.dtype if client_head is not None else None,
        model=model,
    )
    _check_disjoint_client_keys(split)
    return split


def _check_crossing(tensor: object, batch: int, producer: str) -> None:
    """A tensor that crosses the data plane: one tensor, batch first, a dtype frames carry."""
    if not isinstance(tensor, torch.Tensor):
        raise CutError(
            f"{producer} returns a {type(tensor).__name__}, but the data plane carries one "
            "tensor per batch; cut where the model passes a single tensor"
        )
    if tensor.dim() < 1 or tensor.shape[0] != batch:
        raise CutError(
            f"{producer} maps a batch of {batch} to shape {tuple(tensor.shape)}; the cut must "
            "keep the batch dimension first"
        )
    try:
        wire_dtype_name(tensor.dtype)
    except WireFormatError as err:
        raise CutError(str(err)) from err


def _check_disjoint_client_keys(split: SplitModel) -> None:
    if split.client_head is None:
        return
    shared = set(split.client_half.state_dict()) & set(split.client_head.state_dict())
    if shared:
        raise CutError(
            f"the client half and the client head both have the state keys {sorted(shared)}; "
            "a client sends both in one ArrayRecord, so give their modules different names"
        )


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode for a probe, then restore each one's own mode."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def _call(module: nn.Module, inputs: ModelInput) -> Any:
    """``module`` on inputs given as a tensor, a tuple of arguments or a dict of keywords."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def _first_tensor(inputs: ModelInput) -> torch.Tensor | None:
    values = (
        inputs.values()
        if isinstance(inputs, Mapping)
        else (inputs if isinstance(inputs, tuple) else (inputs,))
    )
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _batch_size(inputs: ModelInput) -> int:
    first = _first_tensor(inputs)
    if first is None or first.dim() < 1:
        raise CutError(
            "sample_input must be a batch of the model's inputs with the batch dimension first "
            "(a tensor, a tuple of arguments or a dict of keyword arguments), e.g. "
            "next(iter(train_loader))[0]"
        )
    return int(first.shape[0])


def _describe(inputs: ModelInput) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"shape {tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items())
    if isinstance(inputs, tuple):
        return ", ".join(_describe(v) for v in inputs)
    return type(inputs).__name__


def _cut_index(names: list[str], cut: int | str) -> int:
    """How many children of a Sequential go before ``cut``."""
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
            f"and {len(names) - 1} so that each part keeps at least one layer. "
            f"Children: [{layers}]"
        )
    return cut
