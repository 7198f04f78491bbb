"""Cutting any traceable ``nn.Module`` into pieces after named modules.

The model is traced with ``torch.fx`` (once in train mode and once in eval mode) and its graph is
cut right after the call of each named module. Every piece shares the model's parameters and
buffers under the model's own names, so a piece's ``state_dict()`` reads like a slice of the
model's. Pieces after the first take exactly one tensor, the activations that cross the cut.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import linecache
import operator
import os
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ._state import modes_kept

__all__ = [
    "CutError",
    "CutPoint",
    "Crossing",
    "GraphPiece",
    "cut_graph",
    "cut_points",
    "materialize",
]


class CutError(ValueError):
    """A model cannot be cut where asked, or its parts do not connect."""


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_HAND_CUT = (
    "Write the pieces by hand as modules of their own and pair them with "
    "splitfed.join_halves(client_half=..., server_half=..., sample_input=...)"
)
# Non-tensor arguments that are fixed at trace time: the graph asserts them when called.
_LEAF_CONSTANTS = (type(None), bool, int, float, str)
_MAX_LISTED = 40


@dataclass(frozen=True)
class Crossing:
    """The one tensor that crosses a cut, as seen on ``sample_input``.

    Attributes
    ----------
    after : str
        Name of the module after whose call the model is cut.
    source : str
        What produces the tensor, in words (e.g. ``"the output of layer1"``).
    shape : tuple[int, ...]
        Shape of one example's activations, without the batch dimension.
    dtype : torch.dtype
        Dtype of the activations.
    """

    after: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class CutPoint:
    """One place where a model could be cut: right after the call of module ``name``.

    Attributes
    ----------
    name : str
        The module's name, as in ``model.named_modules()``.
    crossing : tuple[str, ...]
        Every value computed before the cut and used after it, in words. A valid cut has one.
    shape : tuple[int, ...] | None
        Shape of one example's activations (no batch dimension) when exactly one tensor crosses.
    dtype : torch.dtype | None
        Their dtype, when exactly one tensor crosses.
    problem : str | None
        Why the model cannot be cut here; ``None`` for a valid cut point.
    """

    name: str
    crossing: tuple[str, ...]
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    problem: str | None

    @property
    def valid(self) -> bool:
        """Whether the model can be cut here (exactly one tensor, with a batch dimension)."""
        return self.problem is None

    def __str__(self) -> str:
        if self.shape is not None and self.problem is None:
            return f"{self.name} ({'x'.join(map(str, self.shape)) or 'scalar'})"
        return self.name


class GraphPiece(nn.Module):
    """One piece of a model cut by :func:`cut_graph`.

    It holds the model's own submodules, parameters and buffers (not copies) under the model's
    names, and runs the part of the model's traced graph between two cuts. When the model's
    ``forward`` reads ``self.training``, the piece holds one graph per mode and runs the one for
    its own ``training`` flag.

    Attributes
    ----------
    index : int
        Position of the piece, 0 for the piece that takes the model's inputs.
    input_crossing : Crossing | None
        What the piece takes (``None`` for the first piece, which takes the model's inputs).
    output_crossing : Crossing | None
        What the piece returns (``None`` for the last piece, which returns the model's output).
    """

    def __init__(
        self,
        *,
        index: int,
        graphs: dict[bool, fx.Graph],
        signature: inspect.Signature,
        input_crossing: Crossing | None,
        output_crossing: Crossing | None,
        training: bool,
    ) -> None:
        super().__init__()
        self.index = index
        self.input_crossing = input_crossing
        self.output_crossing = output_crossing
        self.training = training
        self._graphs = graphs
        self._signature = signature
        # Modules whose traced forward may read ``self.training``; see ``_check_modes``.
        self._mode_readers: tuple[str, ...] = ()
        self._forwards: dict[bool, Callable[..., Any]] = {}

    @property
    def code(self) -> str:
        """Python source of the piece's forward (one per mode when the modes differ)."""
        train, evaluate = self._graphs[True], self._graphs[False]
        if train is evaluate:
            return train.python_code(root_module="self").src
        return (
            "# train mode\n"
            + train.python_code(root_module="self").src
            + "\n# eval mode\n"
            + evaluate.python_code(root_module="self").src
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run this piece; the first piece takes the model's inputs, later ones one tensor."""
        if self._mode_readers:
            self._check_modes()
        run = self._forwards.get(self.training)
        if run is None:
            run = _compile(self._graphs[self.training])
            self._forwards[self.training] = run
        positional, keywords = _call_arguments(self._signature, args, kwargs)
        return run(self, *positional, **keywords)

    def _check_modes(self) -> None:
        """Refuse to run with traced modules in another mode than the piece."""
        wrong = [
            name
            for name in self._mode_readers
            if self.get_submodule(name).training != self.training
        ]
        if wrong:
            mode = "train" if self.training else "eval"
            raise RuntimeError(
                f"this piece is in {mode} mode, but {_quote(wrong)} "
                f"{'is' if len(wrong) == 1 else 'are'} not. The model's forward reads "
                "self.training, so the piece runs one graph per mode: set the mode on the whole "
                "piece with .train() or .eval()"
            )

    def __getstate__(self) -> dict[str, Any]:
        # Compiled forwards are generated functions, which pickle cannot save; they are rebuilt.
        state = dict(self.__dict__)
        state["_forwards"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forwards = {}


def cut_graph(model: nn.Module, *, cuts: Sequence[str], sample_input: Any) -> list[GraphPiece]:
    """Cut ``model`` right after the call of each module named in ``cuts``.

    Parameters
    ----------
    model : nn.Module
        The model. It is traced with ``torch.fx``, which needs a ``forward`` without Python
        control flow on tensor values. It may live on the meta device: nothing is allocated,
        and :func:`materialize` gives a piece real storage afterwards.
    cuts : Sequence[str]
        Module names as in ``model.named_modules()``, in forward order: everything ``forward``
        computes up to and including the call of ``cuts[i]`` goes to piece ``i``. One cut gives
        a client half and a server half; two cuts give client half, server half and client head
        (the label-private split).
    sample_input : Any
        The model's inputs: a tensor, a tuple of positional arguments, or a dict of keyword
        arguments for ``model.forward``, batch dimension first. Used for tracing (arguments that
        are not tensors, and defaults of arguments not given, are fixed in the graph) and to
        record the shapes that cross each cut. It may be on the CPU for a model on meta.

    Returns
    -------
    list[GraphPiece]
        ``len(cuts) + 1`` pieces. The first takes the model's inputs like the model; every later
        piece takes one tensor; every piece but the last returns one tensor, and the last returns
        what the model returns. The pieces share the model's parameters and buffers, and their
        ``state_dict()`` keys are the model's keys, split without overlap. Parameters and
        buffers that ``forward`` never uses belong to a piece only if their module does.

    Raises
    ------
    CutError
        If a name is not a module called exactly once by ``forward``, the cuts are out of order,
        more than one value (or no tensor) crosses a cut, a parameter would be used on both
        sides of a cut, or ``torch.fx`` cannot trace the model. The message says what crosses
        and where the nearest valid cuts are.
    """
    names = _check_cut_names(cuts)
    try:
        return _cut(model, names, sample_input, stack_traces=False)
    except CutError:
        # Errors name lines of forward(); recording where every node came from costs a trace's
        # worth of imports and memory, so it is done only to explain a refusal.
        _cut(model, names, sample_input, stack_traces=True)
        raise


def _cut(
    model: nn.Module, names: list[str], sample_input: Any, *, stack_traces: bool
) -> list[GraphPiece]:
    modules = dict(model.named_modules(remove_duplicate=False))
    known = [name for name in names if name in modules]
    through = {prefix for name in known for prefix in _prefixes(name)}
    analysis = _analyse(model, sample_input, trace_through=through, stack_traces=stack_traces)
    for name in names:
        if name not in modules:
            raise CutError(_unknown_name_message(name, modules, analysis))
    boundaries = [_boundaries(trace, names, analysis) for trace in analysis.traces]
    for trace, positions in zip(analysis.traces, boundaries, strict=True):
        _check_pieces(trace, names, positions)
    return _build_pieces(model, names, boundaries, analysis)


def cut_points(model: nn.Module, *, sample_input: Any) -> list[CutPoint]:
    """List the places where ``model`` could be cut, in forward order.

    Every module that ``forward`` calls exactly once is a candidate; :attr:`CutPoint.valid`
    says whether exactly one tensor (with a batch dimension) crosses right after its call in
    both train and eval mode. Modules inside ``torch.nn`` modules that ``torch.fx`` keeps whole
    (e.g. the layers of an ``nn.TransformerEncoder``) are not listed, but can still be named in
    :func:`cut_graph`, which then traces into them.

    Parameters
    ----------
    model : nn.Module
        The model, as for :func:`cut_graph`.
    sample_input : Any
        The model's inputs, as for :func:`cut_graph`.

    Raises
    ------
    CutError
        If ``torch.fx`` cannot trace the model.
    """
    return _merged_points(_analyse(model, sample_input, trace_through=set()))


def materialize(module: nn.Module, *, device: str | torch.device = "cpu") -> nn.Module:
    """Give a module built on the meta device real, uninitialised storage on ``device``.

    Parameters and persistent buffers on meta get new, uninitialised storage: load weights into
    the module afterwards (``load_state_dict``). Tensors already on a real device keep their
    values and move to ``device``. Tied parameters stay tied. Only ``module`` is touched, so a
    client materialises its own piece and never holds the memory of the other pieces.

    Parameters
    ----------
    module : nn.Module
        The module (e.g. a piece from :func:`cut_graph`), changed in place.
    device : str | torch.device
        Where the storage goes.

    Returns
    -------
    nn.Module
        ``module`` itself.

    Raises
    ------
    CutError
        If a non-persistent buffer is on meta: it is not in the state dict, so loading weights
        could not restore its value. Nothing is changed then.
    """
    target = torch.device(device)
    lost = [
        name
        for name, owner, key in _named_buffer_slots(module)
        if key in owner._non_persistent_buffers_set and _buffer(owner, key).is_meta
    ]
    if lost:
        raise CutError(
            f"cannot materialise: the non-persistent buffers {_quote(lost)} are on the meta "
            "device and are not part of the state dict, so loading weights cannot restore their "
            "values. Build the module where these buffers are computed on a real device, or "
            "register them with persistent=True so that load_state_dict fills them"
        )
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    # Memoised by identity, so that tensors shared between modules (tied weights) stay shared.
    for sub in module.modules():
        for key, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in params:
                if param.is_meta:
                    params[id(param)] = nn.Parameter(
                        torch.empty_like(param, device=target), requires_grad=param.requires_grad
                    )
                else:
                    if param.device != target:
                        param.data = param.data.to(target)
                    params[id(param)] = param
            sub._parameters[key] = params[id(param)]
        for key, buf in list(sub._buffers.items()):
            if buf is None:
                continue
            if id(buf) not in buffers:
                buffers[id(buf)] = (
                    torch.empty_like(buf, device=target) if buf.is_meta else buf.to(target)
                )
            sub._buffers[key] = buffers[id(buf)]
    return module


# -- tracing ------------------------------------------------------------------------------------


@dataclass
class _Call:
    """Calls of one module while tracing: how many, and the last node each call left."""

    count: int = 0
    end: fx.Node | None = None
    order: int = 0


@dataclass(frozen=True)
class _Value:
    """What a node computed on the sample: a tensor's shape and dtype, or a type's name."""

    kind: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None


@dataclass
class _Trace:
    """The graph of ``forward`` in one mode, with module calls and propagated values."""

    training: bool
    graph: fx.Graph
    calls: dict[str, _Call]
    traced: set[str]
    index: dict[fx.Node, int] = field(default_factory=dict)
    values: dict[fx.Node, _Value] = field(default_factory=dict)
    points: list[_Point] = field(default_factory=list)


@dataclass(frozen=True)
class _Point:
    name: str
    position: int
    crossing: tuple[fx.Node, ...]
    problem: str | None


@dataclass
class _Analysis:
    """Everything ``cut_graph`` and ``cut_points`` learn from tracing the model."""

    traces: list[_Trace]
    constants: dict[str, Any]
    signature: inspect.Signature
    batch: int
    valid: set[str] = field(default_factory=set)


class _Tracer(fx.Tracer):
    """A tracer that records where each module call ends and which modules it traced into."""

    def __init__(self, trace_through: set[str], *, stack_traces: bool = True) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces
        self.trace_through = trace_through
        self.calls: dict[str, _Call] = {}
        self.traced: set[str] = set()
        self.hooked: list[str] = []
        self.state = _grad_state()
        self.state_changed: fx.Node | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.trace_through:
            return False
        return bool(super().is_leaf_module(m, module_qualified_name))

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # A graph does not record torch.no_grad() or autocast blocks inside forward, so the
        # pieces would compute their operations differently from the model.
        if self.state_changed is None and _grad_state() != self.state:
            self.state_changed = node
        return node

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        name = self.path_of_module(m)
        if not self.is_leaf_module(m, name):
            self.traced.add(name)
            if _has_hooks(m):
                # A traced graph calls forward directly: hooks of traced modules would not run.
                self.hooked.append(name)
        result = super().call_module(m, forward, args, kwargs)
        call = self.calls.setdefault(name, _Call(order=len(self.calls)))
        call.count += 1
        call.end = _last_node(self.graph)
        return result


def _analyse(
    model: nn.Module, sample_input: Any, *, trace_through: set[str], stack_traces: bool = True
) -> _Analysis:
    """Trace ``model`` in train and eval mode and propagate ``sample_input`` through both."""
    args, kwargs = _split_input(sample_input)
    signature = _signature(model)
    concrete, inputs = _bind(model, signature, args, kwargs)
    batch = _batch_size(args, kwargs)
    modes = {module: module.training for module in model.modules()}
    attributes = set(model.__dict__)
    traces: list[_Trace] = []
    constants: dict[str, Any] = {}
    try:
        for training in (True, False):
            model.train(training)
            tracer = _Tracer(trace_through, stack_traces=stack_traces)
            graph = _trace(tracer, model, concrete)
            # The tracer stores constant tensors made in forward as attributes of the model.
            made = {key: model.__dict__.pop(key) for key in set(model.__dict__) - attributes}
            hooked = ([""] if _has_hooks(model) else []) + tracer.hooked
            if hooked:
                which = _quote([n or "the model itself" for n in hooked])
                has = f"the module {which} has" if len(hooked) == 1 else f"the modules {which} have"
                raise CutError(
                    f"{has} forward or backward hooks, which a traced graph would skip because it "
                    "calls forward directly. Remove the hooks before cutting, or "
                    + _lower(_HAND_CUT)
                )
            if tracer.state_changed is not None:
                line = _source_line(tracer.state_changed.stack_trace)
                raise CutError(
                    f"{type(model).__name__}.forward changes the gradient or autocast mode "
                    f"(torch.no_grad, torch.enable_grad, torch.inference_mode or torch.autocast)"
                    f"{f' around {line}' if line else ''}, which a traced graph does not record: "
                    "the pieces would compute those operations differently. " + _HAND_CUT
                )
            if traces and _same_code(traces[0].graph, graph) and _same_constants(constants, made):
                break
            if traces:
                made = _rename_constants(graph, made, taken=set(constants) | set(model.__dict__))
            constants.update(made)
            traces.append(_Trace(training, graph, tracer.calls, tracer.traced))
        for trace in traces:
            trace.index = {node: i for i, node in enumerate(trace.graph.nodes)}
            model.train(trace.training)
            trace.values = _propagate(model, trace.graph, inputs, constants)
    finally:
        for key in set(model.__dict__) - attributes:
            del model.__dict__[key]
        for module, mode in modes.items():
            module.training = mode
    analysis = _Analysis(traces, constants, signature, batch)
    for trace in traces:
        trace.points = _trace_points(trace, analysis)
    analysis.valid = {point.name for point in _merged_points(analysis) if point.valid}
    return analysis


def _trace(tracer: _Tracer, model: nn.Module, concrete: dict[str, Any]) -> fx.Graph:
    try:
        return tracer.trace(model, concrete_args=concrete or None)
    except CutError:
        raise
    except Exception as err:
        frames = traceback.extract_tb(err.__traceback__)
        where = _user_frame(frames)
        inner = _inner_frame(frames)
        at = f" at {where}" if where else ""
        if inner and inner != where:
            at += f", inside {inner}"
        raise CutError(
            f"torch.fx cannot trace {type(model).__name__}.forward{at}: "
            f"{type(err).__name__}: {err}. A graph cannot capture Python control flow that "
            "depends on tensor values (if/while on a tensor, int(), len() or iteration of a "
            "tensor) nor calls into code that needs real tensors. " + _HAND_CUT
        ) from err


def _propagate(
    model: nn.Module, graph: fx.Graph, inputs: list[Any], constants: dict[str, Any]
) -> dict[fx.Node, _Value]:
    """Record the shape and dtype of every node's value.

    A model with real weights runs the sample once, in eval mode, without gradients and with
    the random state restored, so nothing of it changes; this is fast, and torch's meta kernels
    (whose first use imports much of torch's compiler) are needed only for a model on the meta
    device, or one whose sample must move to another device first.
    """
    real_error: Exception | None = None
    if not _on_meta(model):
        try:
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=_cuda_devices(model)),
                modes_kept(model, training=False),
            ):
                return _record(model, graph, inputs, constants)
        except Exception as real_err:
            real_error = real_err
    try:
        return _propagate_on_meta(model, graph, inputs, constants)
    except Exception as meta_err:
        failure = real_error or meta_err
        on = "" if real_error else "meta tensors of "
        raise CutError(
            f"the model fails on {on}sample_input{_failure(failure)}. Check that sample_input "
            "is a batch of the model's inputs"
        ) from failure


class _NodeFailure(Exception):
    """A node of the graph failed on the sample; ``node`` says which."""

    def __init__(self, node: fx.Node, error: Exception) -> None:
        super().__init__(str(error))
        self.node = node
        self.error = error


def _failure(err: Exception) -> str:
    """Where and how propagation failed, for a message: `` at <node>: <error>``."""
    if isinstance(err, _NodeFailure):
        # The interpreter appends its own trace to the message; its first paragraph suffices.
        first = str(err.error).split("\n\n")[0].strip()
        return f" at {_describe(err.node)}: {type(err.error).__name__}: {first}"
    return f": {type(err).__name__}: {err}"


def _propagate_on_meta(
    model: nn.Module, graph: fx.Graph, inputs: list[Any], constants: dict[str, Any]
) -> dict[fx.Node, _Value]:
    meta: dict[int, torch.Tensor] = {}

    def to_meta(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in meta:
            meta[id(value)] = (
                value.detach().to("meta").requires_grad_(value.requires_grad)
                if value.is_floating_point() or value.is_complex()
                else value.detach().to("meta")
            )
        return meta[id(value)]

    state = {
        "model." + name: to_meta(tensor)
        for name, tensor in itertools.chain(
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False),
        )
    }
    meta_inputs = pytree.tree_map(to_meta, inputs)
    meta_constants = {key: to_meta(value) for key, value in constants.items()}
    runner = _Runner(model, graph, meta_constants)
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        torch.func.functional_call(runner, state, tuple(meta_inputs), strict=False)
    return runner.values


class _Runner(nn.Module):
    """Runs a graph against ``model`` so that ``functional_call`` can swap its tensors."""

    def __init__(self, model: nn.Module, graph: fx.Graph, constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.graph = graph
        self.constants = constants
        self.values: dict[fx.Node, _Value] = {}

    def forward(self, *inputs: Any) -> None:
        self.values = _record(self.model, self.graph, list(inputs), self.constants)


def _record(
    model: nn.Module, graph: fx.Graph, inputs: list[Any], constants: dict[str, Any]
) -> dict[fx.Node, _Value]:
    values: dict[fx.Node, _Value] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                result = super().run_node(n)
            except _NodeFailure:
                raise
            except Exception as err:
                raise _NodeFailure(n, err) from err
            values[n] = _summarise(result)
            return result

        def fetch_attr(self, target: str) -> Any:
            if target in constants:
                return constants[target]
            return super().fetch_attr(target)

    Recorder(model, graph=graph).run(*inputs)
    return values


def _summarise(value: Any) -> _Value:
    if isinstance(value, torch.Tensor):
        return _Value("tensor", tuple(value.shape), value.dtype)
    return _Value(type(value).__name__)


# -- finding cut points -------------------------------------------------------------------------


def _trace_points(trace: _Trace, analysis: _Analysis) -> list[_Point]:
    """Every module call of one trace as a candidate cut, in the order the calls end."""
    nodes = list(trace.graph.nodes)
    last_use = {node: max(trace.index[user] for user in node.users) for node in nodes if node.users}
    last_compute = max(
        (i for i, node in enumerate(nodes) if node.op.startswith("call_")), default=-1
    )
    # Values live across position p: defined at or before p and used after it. One sweep over
    # the nodes gives them for every position; attributes are read again where needed.
    ends = sorted(
        (trace.index[call.end], call.order, name)
        for name, call in trace.calls.items()
        if call.end is not None
    )
    live: dict[fx.Node, None] = {}
    points = []
    cursor = 0
    for position, _, name in ends:
        while cursor <= position:
            node = nodes[cursor]
            if node.op != "get_attr" and last_use.get(node, -1) > cursor:
                live[node] = None
            cursor += 1
        for node in [node for node in live if last_use[node] <= position]:
            del live[node]
        crossing = tuple(live)
        problem = _problem(trace.calls[name], crossing, position < last_compute, trace, analysis)
        points.append(_Point(name, position, crossing, problem))
    return points


def _problem(
    call: _Call,
    crossing: tuple[fx.Node, ...],
    compute_after: bool,
    trace: _Trace,
    analysis: _Analysis,
) -> str | None:
    if call.count > 1:
        return f"it is called {call.count} times in forward, so 'after it' is ambiguous"
    if not compute_after:
        return "nothing is computed after it, so the next piece would be empty"
    if not crossing:
        return "no value crosses it: the rest of forward does not use what came before"
    if len(crossing) > 1:
        return f"{len(crossing)} values cross it: " + "; ".join(map(_describe, crossing))
    value = trace.values.get(crossing[0])
    if value is None or value.kind != "tensor":
        kind = value.kind if value is not None else "value"
        return f"what crosses it is a {kind}, not a tensor: {_describe(crossing[0])}"
    if not value.shape or value.shape[0] != analysis.batch:
        return (
            f"what crosses it has shape {tuple(value.shape)}, without the batch of "
            f"{analysis.batch} first: {_describe(crossing[0])}"
        )
    return None


def _merged_points(analysis: _Analysis) -> list[CutPoint]:
    """Cut points valid in every mode the model was traced in."""
    first = analysis.traces[0]
    others = [{point.name: point for point in trace.points} for trace in analysis.traces[1:]]
    merged = []
    for point in first.points:
        problem = point.problem
        for trace, by_name in zip(analysis.traces[1:], others, strict=True):
            other = by_name.get(point.name)
            mode = "eval" if not trace.training else "train"
            if problem is None and other is None:
                problem = f"forward does not call it in {mode} mode"
            elif problem is None and other is not None and other.problem is not None:
                problem = f"in {mode} mode, {other.problem}"
        shape: tuple[int, ...] | None = None
        dtype: torch.dtype | None = None
        if len(point.crossing) == 1:
            value = first.values.get(point.crossing[0])
            if value is not None and value.kind == "tensor" and value.shape:
                shape, dtype = value.shape[1:], value.dtype
        crossing = tuple(_describe(node) for node in point.crossing)
        merged.append(CutPoint(point.name, crossing, shape, dtype, problem))
    return merged


def _boundaries(trace: _Trace, names: list[str], analysis: _Analysis) -> list[int]:
    """Position of the last node of each cut module's call in ``trace``, checked."""
    mode = "train" if trace.training else "eval"
    in_mode = f" in {mode} mode" if len(analysis.traces) > 1 else ""
    by_name = {point.name: point for point in trace.points}
    positions = []
    for name in names:
        call = trace.calls.get(name)
        if call is None:
            raise CutError(_not_called_message(name, trace, analysis, in_mode))
        point = by_name[name]
        if point.problem is not None:
            raise CutError(
                f"cannot cut after {name}{in_mode}: {point.problem}. "
                + _nearest_message(trace, point.position, analysis)
            )
        positions.append(point.position)
    for (a, pa), (b, pb) in itertools.pairwise(zip(names, positions, strict=True)):
        if pb < pa:
            raise CutError(
                f"cuts must be given in forward order, but {b} runs before {a}: "
                f"give cuts=[{b!r}, {a!r}]"
            )
        if pb == pa:
            raise CutError(
                f"{a} and {b} end at the same point of forward, so the piece between them would "
                "be empty; name cuts that are further apart"
            )
    return positions


def _check_pieces(trace: _Trace, names: list[str], positions: list[int]) -> None:
    """Refuse a piece that computes nothing."""
    nodes = list(trace.graph.nodes)
    for (a, pa), (b, pb) in itertools.pairwise(zip(names, positions, strict=True)):
        if not any(node.op.startswith("call_") for node in nodes[pa + 1 : pb + 1]):
            raise CutError(
                f"nothing is computed between {a} and {b}, so the piece between them would be "
                "empty; name cuts that are further apart"
            )


# -- building the pieces ------------------------------------------------------------------------


def _build_pieces(
    model: nn.Module, names: list[str], boundaries: list[list[int]], analysis: _Analysis
) -> list[GraphPiece]:
    count = len(names) + 1
    graphs: list[dict[bool, fx.Graph]] = [{} for _ in range(count)]
    calls: list[set[str]] = [set() for _ in range(count)]
    attrs: list[set[str]] = [set() for _ in range(count)]
    scopes: list[set[str]] = [set() for _ in range(count)]
    crossings: list[list[Crossing]] = []
    for trace, positions in zip(analysis.traces, boundaries, strict=True):
        by_name = {point.name: point for point in trace.points}
        crossing_nodes = [by_name[name].crossing[0] for name in names]
        crossings.append(
            [_crossing(name, node, trace) for name, node in zip(names, crossing_nodes, strict=True)]
        )
        split = _split_graph(trace, positions, crossing_nodes)
        for index, (graph, piece_calls, piece_attrs, piece_scopes) in enumerate(split):
            graphs[index][trace.training] = graph
            calls[index] |= piece_calls
            attrs[index] |= piece_attrs
            scopes[index] |= piece_scopes
    if len(analysis.traces) == 1:
        for piece_graphs in graphs:
            piece_graphs[not analysis.traces[0].training] = piece_graphs[
                analysis.traces[0].training
            ]
    elif any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(crossings[0], crossings[1], strict=True)
    ):
        differ = [
            f"after {a.after}: {a.shape} {a.dtype} in train mode, {b.shape} {b.dtype} in eval mode"
            for a, b in zip(crossings[0], crossings[1], strict=True)
            if (a.shape, a.dtype) != (b.shape, b.dtype)
        ]
        raise CutError(
            "what crosses a cut differs between train and eval mode ("
            + "; ".join(differ)
            + "), so the data plane could not use one activation shape; cut elsewhere"
        )
    touched = _touched(calls, attrs, scopes)
    readers = set().union(*(trace.traced for trace in analysis.traces))
    pieces = []
    for index in range(count):
        piece = GraphPiece(
            index=index,
            graphs=graphs[index],
            signature=analysis.signature if index == 0 else _ONE_TENSOR,
            input_crossing=crossings[0][index - 1] if index > 0 else None,
            output_crossing=crossings[0][index] if index < len(names) else None,
            training=model.training,
        )
        _fill(piece, model, "", index, calls[index], attrs[index], touched, analysis.constants)
        if len(analysis.traces) > 1:
            piece._mode_readers = tuple(
                sorted(name for name in readers if _has_submodule(piece, name))
            )
        pieces.append(piece)
    _check_shared_state(pieces, names)
    return pieces


_ONE_TENSOR = inspect.Signature([inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD)])


def _crossing(name: str, node: fx.Node, trace: _Trace) -> Crossing:
    value = trace.values[node]
    if value.dtype is None:
        raise AssertionError(f"{node} crosses a cut but is not a tensor")
    return Crossing(name, _describe(node), value.shape[1:], value.dtype)


def _split_graph(
    trace: _Trace, positions: list[int], crossing: list[fx.Node]
) -> list[tuple[fx.Graph, set[str], set[str], set[str]]]:
    """Copy the nodes between consecutive cuts into one graph each."""
    nodes = list(trace.graph.nodes)
    bounds = [-1, *positions, len(nodes) - 1]
    return [
        _piece_graph(
            nodes[bounds[piece] + 1 : bounds[piece + 1] + 1],
            crossing[piece - 1] if piece > 0 else None,
            crossing[piece] if piece < len(positions) else None,
        )
        for piece in range(len(positions) + 1)
    ]


def _piece_graph(
    nodes: list[fx.Node], incoming: fx.Node | None, outgoing: fx.Node | None
) -> tuple[fx.Graph, set[str], set[str], set[str]]:
    """A graph of ``nodes`` that takes ``incoming`` (if any) and returns ``outgoing`` (if any).

    Also returns the modules it calls, the attributes it reads, and the modules whose traced
    forward contributed nodes to it.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    calls: set[str] = set()
    attrs: set[str] = set()
    scopes: set[str] = set()
    if incoming is not None:
        env[incoming] = graph.placeholder("x")

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"{node} crosses a cut unexpectedly")
            # Attributes are read again in each piece that uses them, not sent across.
            env[node] = graph.get_attr(str(node.target))
            env[node].meta = dict(node.meta)
            attrs.add(str(node.target))
        return env[node]

    for node in nodes:
        if node.op == "get_attr":
            continue
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lookup))
            continue
        if node.op == "call_module":
            calls.add(str(node.target))
        scopes.update(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
        env[node] = graph.node_copy(node, lookup)
    if outgoing is not None:
        graph.output(env[outgoing])
    graph.lint()
    return graph, calls, attrs, scopes


def _touched(
    calls: list[set[str]], attrs: list[set[str]], scopes: list[set[str]]
) -> dict[str, set[int]]:
    """For each module path, the pieces that run (part of) it or read from it."""
    touched: dict[str, set[int]] = {}
    for piece, (piece_calls, piece_attrs) in enumerate(zip(calls, attrs, strict=True)):
        for target in piece_calls | scopes[piece]:
            for prefix in (*_prefixes(target), target):
                touched.setdefault(prefix, set()).add(piece)
        for target in piece_attrs:
            for prefix in _prefixes(target):
                touched.setdefault(prefix, set()).add(piece)
    return touched


def _fill(
    box: nn.Module,
    source: nn.Module,
    prefix: str,
    piece: int,
    calls: set[str],
    attrs: set[str],
    touched: dict[str, set[int]],
    constants: dict[str, Any],
) -> None:
    """Give ``box`` the parts of ``source`` that ``piece`` uses, under the same names.

    A module that only this piece uses is attached whole (the model's own object), so that its
    unused parameters stay with it; a module several pieces use gets an empty container here
    that holds only what this piece needs.
    """
    for name, child in source._modules.items():
        if child is None:
            continue
        path = prefix + name
        users = touched.get(path, set())
        if path in calls or users == {piece}:
            box.add_module(name, child)
        elif piece in users:
            container = nn.Module()
            container.training = child.training
            box.add_module(name, container)
            _fill(container, child, path + ".", piece, calls, attrs, touched, constants)
    for target in attrs:
        owner_path, _, key = target.rpartition(".")
        if owner_path != prefix.rstrip("."):
            continue
        if prefix == "" and key in constants:
            value = constants[key]
            if isinstance(value, torch.Tensor):
                box.register_buffer(key, value, persistent=False)
            else:
                setattr(box, key, value)
        elif key in source._parameters:
            box.register_parameter(key, source._parameters[key])
        elif key in source._buffers:
            persistent = key not in source._non_persistent_buffers_set
            box.register_buffer(key, source._buffers[key], persistent=persistent)
        else:
            setattr(box, key, getattr(source, key))


def _check_shared_state(pieces: list[GraphPiece], names: list[str]) -> None:
    """Refuse a parameter or persistent buffer that two pieces would hold."""
    owners: dict[int, tuple[int, str]] = {}
    for piece in pieces:
        for key, tensor in _named_state(piece):
            first = owners.setdefault(id(tensor), (piece.index, key))
            if first[0] != piece.index:
                where = (
                    f"after {names[first[0]]}"
                    if piece.index == first[0] + 1
                    else f"after {', '.join(names[first[0] : piece.index])}"
                )
                same = (
                    f"{first[1]} and {key} are the same tensor (tied weights)"
                    if first[1] != key
                    else key
                )
                raise CutError(
                    f"a parameter or buffer is used on both sides of the cut {where}: {same}, "
                    f"in pieces {first[0]} and {piece.index}. Each piece trains on its own "
                    "machine, so pieces cannot share a parameter or buffer; choose cuts that keep "
                    "every use of it in one piece"
                )


def _named_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    for name, owner, key in _named_buffer_slots(module):
        if key not in owner._non_persistent_buffers_set:
            yield name, _buffer(owner, key)


def _named_buffer_slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for key, buf in sub._buffers.items():
            if buf is not None:
                yield (f"{prefix}.{key}" if prefix else key), sub, key


def _buffer(owner: nn.Module, key: str) -> torch.Tensor:
    buf = owner._buffers[key]
    if buf is None:
        raise AssertionError(f"buffer {key} is None")
    return buf


def _compile(graph: fx.Graph) -> Callable[..., Any]:
    """Turn a graph into a ``forward(self, ...)`` function that reads attributes from self."""
    code = graph.python_code(root_module="self")
    filename = f"<splitfed.graph piece {next(_PIECE_IDS)}>"
    # Registered so that tracebacks through a piece show the generated source.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    forward: Callable[..., Any] = namespace["forward"]
    return forward


_PIECE_IDS = itertools.count()


# -- messages -----------------------------------------------------------------------------------

_OPERATORS: dict[Any, str] = {
    operator.add: "+",
    operator.iadd: "+=",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.matmul: "@",
    operator.pow: "**",
    operator.neg: "unary -",
    operator.getitem: "indexing [...]",
}


def _describe(node: fx.Node) -> str:
    """A value of the graph in words: which module or operation produced it, and where."""
    if node.op == "placeholder":
        return f"the model's input `{str(node.target).lstrip('*')}`"
    if node.op == "call_module":
        return f"the output of {node.target}"
    if node.op == "get_attr":
        return f"the attribute {node.target}"
    if node.op == "call_method":
        what = f"`.{node.target}()`"
    elif node.target in _OPERATORS:
        what = f"`{_OPERATORS[node.target]}`"
    else:
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", repr(node.target))
        module = {"_operator": "operator", "builtins": ""}.get(module, module)
        what = f"`{module}.{name}`" if module else f"`{name}`"
    stack = node.meta.get("nn_module_stack") or {}
    scope = f"in {list(stack.values())[-1][0]}" if stack else "in the model's forward"
    line = _source_line(node.stack_trace)
    return f"the result of {what} {scope}" + (f" ({line})" if line else "")


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>.*)')


def _source_line(stack_trace: str | None) -> str | None:
    if not stack_trace:
        return None
    frames = [
        traceback.FrameSummary(m["file"], int(m["line"]), "", line=m["code"])
        for m in _FRAME.finditer(stack_trace)
    ]
    return _user_frame(frames)


def _user_frame(frames: Sequence[traceback.FrameSummary]) -> str | None:
    """The innermost frame in the model's code, as ``file:line `source```."""
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path == _THIS_FILE:
            continue
        code = (frame.line or "").strip()
        return f"{os.path.basename(frame.filename)}:{frame.lineno} `{code}`"
    return None


def _inner_frame(frames: Sequence[traceback.FrameSummary]) -> str | None:
    """The innermost frame outside the tracer, which may be inside torch's own modules."""
    fx_dir = os.path.join(_TORCH_DIR, "fx") + os.sep
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(fx_dir) or path == _THIS_FILE:
            continue
        name = (
            "torch/" + os.path.relpath(path, _TORCH_DIR)
            if path.startswith(_TORCH_DIR)
            else os.path.basename(path)
        )
        return f"{name}:{frame.lineno} `{(frame.line or '').strip()}`"
    return None


def _valid_listing(trace: _Trace, analysis: _Analysis) -> str:
    valid = [point for point in trace.points if point.name in analysis.valid]
    if not valid:
        return "The model has no valid cut point."
    shown = ", ".join(_point_label(point, trace) for point in valid[:_MAX_LISTED])
    more = f", and {len(valid) - _MAX_LISTED} more" if len(valid) > _MAX_LISTED else ""
    return f"Valid cut points (per-example activation shape): {shown}{more}."


def _point_label(point: _Point, trace: _Trace) -> str:
    value = trace.values.get(point.crossing[0]) if point.crossing else None
    if value is None or value.kind != "tensor":
        return point.name
    return f"{point.name} ({'x'.join(map(str, value.shape[1:])) or 'scalar'})"


def _nearest_message(trace: _Trace, position: int, analysis: _Analysis) -> str:
    valid = [point for point in trace.points if point.name in analysis.valid]
    before = [point for point in valid if point.position < position]
    after = [point for point in valid if point.position > position]
    near_before = _point_label(before[-1], trace) if before else "none"
    near_after = _point_label(after[0], trace) if after else "none"
    return (
        f"Nearest cut points where exactly one tensor crosses: before it {near_before}, "
        f"after it {near_after}. Call splitfed.cut_points(model, sample_input=...) to list "
        "all."
    )


def _unknown_name_message(name: str, modules: dict[str, nn.Module], analysis: _Analysis) -> str:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
    hint = f" Did you mean {_quote(close, 'or')}?" if close else ""
    return f"the model has no module named {name!r}.{hint} " + _valid_listing(
        analysis.traces[0], analysis
    )


def _not_called_message(name: str, trace: _Trace, analysis: _Analysis, in_mode: str) -> str:
    inside = [
        point.name
        for point in trace.points
        if point.name.startswith(name + ".") and point.name in analysis.valid
    ]
    hint = (
        f" Modules inside it that forward calls and that are valid cuts: {_quote(inside)}; "
        f"cut after {inside[-1]} to cut after the last of them."
        if inside
        else ""
    )
    return (
        f"{name} is a module of the model, but forward never calls it{in_mode} (a container "
        f"such as nn.ModuleList is iterated, not called, and an unused module runs nowhere), "
        f"so there is no point 'after {name}'.{hint} " + _valid_listing(trace, analysis)
    )


def _quote(items: Sequence[str], conjunction: str = "and") -> str:
    quoted = [f"`{item}`" for item in items]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + f" {conjunction} " + quoted[-1]


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


# -- small helpers ------------------------------------------------------------------------------


def _check_cut_names(cuts: Sequence[str]) -> list[str]:
    if isinstance(cuts, str):
        raise CutError(f"cuts must be a list of module names, e.g. cuts=[{cuts!r}]")
    names = list(cuts)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise CutError(
            f"cuts must be a non-empty list of module names (the empty name is the whole "
            f"model), got {cuts!r}"
        )
    if len(set(names)) != len(names):
        raise CutError(f"cuts names a module twice: {names}")
    return names


def _prefixes(name: str) -> list[str]:
    """Proper ancestors of a dotted module path: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _split_input(sample_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(sample_input, torch.Tensor):
        return (sample_input,), {}
    if isinstance(sample_input, tuple):
        return sample_input, {}
    if isinstance(sample_input, dict) and all(isinstance(key, str) for key in sample_input):
        return (), dict(sample_input)
    raise CutError(
        "sample_input must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments for the model's forward, got {type(sample_input).__name__}"
    )


def _signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def _call_arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Arguments for a traced forward: named parameters in order (the tracer names some of them
    differently, so they go by position), then ``*args``, then ``**kwargs``."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    positional: list[Any] = []
    extra_args: tuple[Any, ...] = ()
    extra_kwargs: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            extra_args = bound.arguments[name]
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            extra_kwargs = bound.arguments[name]
        else:
            positional.append(bound.arguments[name])
    return [*positional, *extra_args], extra_kwargs


def _bind(
    model: nn.Module,
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], list[Any]]:
    """Arguments fixed at trace time, and the sample's arguments in the order of forward's."""
    try:
        bound = signature.bind(*args, **kwargs)
        inputs, extra_kwargs = _call_arguments(signature, args, kwargs)
    except TypeError as err:
        raise CutError(
            f"sample_input does not fit {type(model).__name__}.forward{signature}: {err}"
        ) from err
    if extra_kwargs:
        raise CutError(
            f"sample_input gives {_quote(list(extra_kwargs))} through "
            f"{type(model).__name__}.forward's **kwargs, which a traced graph cannot take; "
            "give only the named parameters of forward"
        )
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    concrete: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        value = bound.arguments.get(name, param.default)
        if param.kind not in variadic and isinstance(value, _LEAF_CONSTANTS):
            concrete[name] = value
    return concrete, inputs


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in pytree.tree_leaves((args, kwargs)):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise CutError(
        "sample_input holds no tensor with a batch dimension; give a batch of the model's "
        "inputs, e.g. next(iter(train_loader))[0]"
    )


def _grad_state() -> tuple[bool, ...]:
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return bool(a.python_code(root_module="self").src == b.python_code(root_module="self").src)


def _same_constants(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, first in a.items():
        second = b[key]
        if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
            same_kind = (first.shape, first.dtype, first.device) == (
                second.shape,
                second.dtype,
                second.device,
            )
            if not same_kind or (not first.is_meta and not torch.equal(first, second)):
                return False
        elif first is not second:
            return False
    return True


def _rename_constants(
    graph: fx.Graph, constants: dict[str, Any], *, taken: set[str]
) -> dict[str, Any]:
    """Give the eval-mode graph's constants names of their own, apart from train mode's."""
    renamed: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, value in constants.items():
        new = f"{key}_eval"
        while new in taken or new in renamed:
            new += "_"
        names[key] = new
        renamed[new] = value
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in names:
            node.target = names[str(node.target)]
    return renamed


def _last_node(graph: fx.Graph) -> fx.Node | None:
    last: fx.Node | None = None
    for node in reversed(graph.nodes):
        last = node
        break
    return last


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted(
        {
            t.device.index or 0
            for t in itertools.chain(model.parameters(), model.buffers())
            if t.device.type == "cuda"
        }
    )
