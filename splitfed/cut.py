"""Cutting a model into the parts SplitFed trains, checked on a sample batch.

A :class:`SplitModel` is one abstraction for every kind of split: the plain split (a client half
and a server half), the label-private, U-shaped split (a client half, a server half and a
client head that keeps the labels and the loss on the client), and either of them with an
auxiliary head for local-loss training (:meth:`SplitModel.with_aux_head`). Whatever the kind, it
answers the same questions: what the client trains (:meth:`SplitModel.client_parameters`), its
state (:meth:`SplitModel.client_state_dict`, :meth:`SplitModel.load_client_state_dict`), what
travels on the data plane (:attr:`SplitModel.activation_shape`, :attr:`SplitModel.output_shape`)
and the unsplit model (:meth:`SplitModel.full_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._state import modes_kept
from .graph import CutError, CutPoint, cut_graph, cut_points, materialize
from .wire import WireFormatError, wire_dtype_name

__all__ = [
    "AUX_HEAD_PREFIX",
    "CutError",
    "CutPoint",
    "ModelInput",
    "SplitModel",
    "cut_points",
    "default_aux_head",
    "join_halves",
    "materialize",
    "split_model",
]

ModelInput = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]
"""What a model's ``forward`` takes: one tensor, a tuple of positional arguments, or a dict of
keyword arguments."""

AUX_HEAD_PREFIX = "aux_head."
"""How the auxiliary head's state keys begin in :meth:`SplitModel.client_state_dict`, so that
they never collide with the model's own."""


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
    aux_head : nn.Module | None (default: None)
        Local-loss training: a small head, run on the client on the cut-layer activations, whose
        loss trains the client half (see :meth:`with_aux_head`). It trains and travels with the
        client half under keys prefixed :data:`AUX_HEAD_PREFIX`, and is no part of the model:
        :meth:`full_model` and evaluation leave it out.
    """

    client_half: nn.Module
    server_half: nn.Module
    activation_shape: tuple[int, ...]
    activation_dtype: torch.dtype
    client_head: nn.Module | None = None
    output_shape: tuple[int, ...] | None = None
    output_dtype: torch.dtype | None = None
    model: nn.Module | None = None
    aux_head: nn.Module | None = None

    @property
    def label_private(self) -> bool:
        """Whether labels and the loss stay on the client (a client head exists)."""
        return self.client_head is not None

    def client_modules(self) -> list[nn.Module]:
        """What each client trains: the client half, then the client head and the auxiliary
        head where there are."""
        return [module for _, module in self._client_parts()]

    def _client_parts(self) -> list[tuple[str, nn.Module]]:
        """The client's modules, each with the prefix of its keys in the client state."""
        parts = [("", self.client_half)]
        if self.client_head is not None:
            parts.append(("", self.client_head))
        if self.aux_head is not None:
            parts.append((AUX_HEAD_PREFIX, self.aux_head))
        return parts

    def client_parameters(self) -> list[nn.Parameter]:
        """The parameters a client's optimizer updates."""
        return [p for module in self.client_modules() for p in module.parameters()]

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        """What a client sends to be merged: the state of the client half, the client head and
        the auxiliary head.

        The keys are the modules' own (for a model cut by :func:`split_model`, the original
        model's), the auxiliary head's prefixed :data:`AUX_HEAD_PREFIX`, so FedAvg merges every
        part like any other arrays.
        """
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self._client_parts():
            state.update({prefix + key: value for key, value in module.state_dict().items()})
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
        for prefix, module in self._client_parts():
            own = module.state_dict()
            mismatched = [
                f"{prefix + key} {tuple(state[prefix + key].shape)} into {tuple(value.shape)}"
                for key, value in own.items()
                if tuple(state[prefix + key].shape) != tuple(value.shape)
            ]
            if mismatched:
                raise CutError(
                    f"the state does not fit this split's client side: {', '.join(mismatched)}. "
                    "Clients and the server must build the same model and cut it at the same place"
                )
            module.load_state_dict({key: state[prefix + key] for key in own})

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
        aux = materialize(self.aux_head, device=device) if self.aux_head else None
        return dataclasses.replace(
            self, client_half=half, client_head=head, aux_head=aux, model=None
        )

    def client_copy(self) -> SplitModel:
        """A copy with its own client parts (the server half is shared, not copied): one per
        client when several clients are simulated in one process."""
        half, head, aux = copy.deepcopy((self.client_half, self.client_head, self.aux_head))
        return dataclasses.replace(
            self, client_half=half, client_head=head, aux_head=aux, model=None
        )

    def full_model(self) -> nn.Module:
        """The unsplit model, sharing the parts' parameters (never the auxiliary head).

        For a model cut by :func:`split_model`, the model itself (its own ``state_dict()``
        keys); for parts joined by hand, the parts run one after another.
        """
        if self.model is not None:
            return self.model
        head = [self.client_head] if self.client_head is not None else []
        return JoinedModel([self.client_half, self.server_half, *head])

    def with_aux_head(
        self,
        aux_head: nn.Module | None = None,
        *,
        num_classes: int | None = None,
        hidden_features: int = 0,
    ) -> SplitModel:
        """This split with an auxiliary head, for the local-loss variant.

        In local-loss training each client trains its half on the loss of ``aux_head`` on the
        cut-layer activations, and the split server trains its half on the activations and
        labels it receives; no gradient crosses the cut. The head trains with the client half,
        travels with it (keys prefixed :data:`AUX_HEAD_PREFIX`) and is merged like it; it is
        not part of :meth:`full_model`. The server and every client must build the same head:
        its weights come from the strategy's message, like the client half's.

        Parameters
        ----------
        aux_head : nn.Module | None (default: None)
            Maps a batch of activations (``(batch, *activation_shape)``) to what the client's
            loss takes (class scores for cross-entropy). ``None`` builds
            :func:`default_aux_head` from the activation shape and ``num_classes``.
        num_classes : int | None (default: None)
            Outputs of the default head; required when ``aux_head`` is ``None``.
        hidden_features : int (default: 0)
            The default head's hidden layer: 0 is a single linear layer, more a two-layer MLP.

        Raises
        ------
        CutError
            For the label-private split (its labels stay on the client, while local-loss sends
            them to the split server), a split that already has an auxiliary head, a head that
            fails on the activations, or a default head without ``num_classes``.
        """
        if self.label_private:
            raise CutError(
                "local-loss training sends the labels to the split server with the activations, "
                "so it cannot keep them on the client as the label-private split does: cut the "
                "model without server_cut for local-loss, or train the label-private split with "
                "variant 'v1' or 'v2'"
            )
        if self.aux_head is not None:
            raise CutError(
                "this split has an auxiliary head already; call with_aux_head on the split "
                "without one"
            )
        if aux_head is None:
            if num_classes is None:
                raise CutError(
                    "the default auxiliary head needs num_classes (the size of the loss's "
                    "input); pass with_aux_head(num_classes=...) or a module of your own, "
                    "with_aux_head(my_head)"
                )
            aux_head = default_aux_head(
                self.activation_shape, num_classes=num_classes, hidden_features=hidden_features
            )
        split = dataclasses.replace(self, aux_head=aux_head)
        _check_aux_head(split, aux_head)
        _check_disjoint_client_keys(split)
        return split


def default_aux_head(
    activation_shape: Sequence[int], *, num_classes: int, hidden_features: int = 0
) -> nn.Sequential:
    """A small auxiliary head for local-loss training: flatten, then one linear layer, or two
    with a ReLU between them when ``hidden_features > 0``.

    It has ``prod(activation_shape) * num_classes`` weights (plus the hidden layer's), built on
    the default device: under ``torch.device("meta")`` it costs no memory until materialised.

    Parameters
    ----------
    activation_shape : Sequence[int]
        One example's cut-layer activations, without the batch dimension.
    num_classes : int
        Its outputs.
    hidden_features : int (default: 0)
        Width of the hidden layer; 0 means none.
    """
    if num_classes < 1 or hidden_features < 0:
        raise CutError(
            f"an auxiliary head needs num_classes >= 1 and hidden_features >= 0; got "
            f"{num_classes} and {hidden_features}"
        )
    features = math.prod(activation_shape)
    if not hidden_features:
        return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, num_classes),
    )


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
    with modes_kept(*parts, training=False), torch.no_grad():
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
    parts = [("the client half", "", split.client_half)]
    if split.client_head is not None:
        parts.append(("the client head", "", split.client_head))
    if split.aux_head is not None:
        parts.append(("the auxiliary head", AUX_HEAD_PREFIX, split.aux_head))
    owners: dict[str, str] = {}
    for name, prefix, module in parts:
        keys = [prefix + key for key in module.state_dict()]
        shared = sorted(key for key in keys if key in owners)
        if shared:
            raise CutError(
                f"{owners[shared[0]]} and {name} both have the state keys {shared}; a client "
                "sends its parts in one ArrayRecord, so give their modules different names"
            )
        owners.update(dict.fromkeys(keys, name))


def _check_aux_head(split: SplitModel, aux_head: nn.Module) -> None:
    """Run ``aux_head`` on a sample of activations (eval mode, no gradients)."""
    parameter = next(aux_head.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    sample = torch.zeros((2, *split.activation_shape), dtype=split.activation_dtype, device=device)
    with modes_kept(aux_head, training=False), torch.no_grad():
        try:
            outputs = aux_head(sample)
        except Exception as err:
            raise CutError(
                f"the auxiliary head fails on activations of shape "
                f"{(2, *split.activation_shape)}: {err}. Its first layer must take what the "
                "client half outputs"
            ) from err
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1 or outputs.shape[0] != 2:
        raise CutError(
            "the auxiliary head must map a batch of activations to one tensor with the batch "
            f"dimension first (what the client's loss takes); it returns {_describe(outputs)}"
        )


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
