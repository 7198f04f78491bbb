"""The data plane's wire format: one frame per message, tensors as raw bytes.

A frame is ``[u32 header length][JSON header][tensor bytes ...]``. The header names the frame's
kind and step, carries a few scalars, and lists each tensor's name, dtype, shape and byte length;
the tensor bytes follow in that order, in native (little-endian) byte order. Nothing is pickled, so
decoding a frame from an untrusted peer can fail but cannot run code.

Floating-point tensors may travel compressed (:data:`COMPRESSIONS`): the tensor's entry then has a
fifth field naming the codec, its dtype and shape stay those of the tensor it decodes to, and its
byte length is what crossed the wire. A frame without compression is byte for byte what it was
before compression existed, and decodes to exactly the tensors that were encoded.

Decoding checks the whole header before it reads a byte of the tensors: a frame that does not add
up, or that does not fit the receiver's :class:`FrameLimits`, is refused with a
:class:`WireFormatError` having cost no more memory than its header. Whatever the bytes, decoding
raises nothing else, and its messages echo at most a short excerpt of what arrived. Every frame
obeys these bounds, with or without limits:

- the header is at most :data:`MAX_HEADER_BYTES` of UTF-8 JSON, nested at most
  :data:`MAX_HEADER_DEPTH` deep, with no key twice in an object and no integer beyond 64 bits;
- the kind is a string of at most :data:`MAX_NAME_CHARS` characters, the step an integer;
- at most :data:`MAX_SCALARS` scalars (strings, integers, floats or booleans) and
  :data:`MAX_TENSORS` tensors, each with its own name;
- a shape has at most :data:`MAX_DIMS` dimensions, each an integer in ``[0, 2**31)``, and its
  product with zero dimensions counted as one is at most :data:`MAX_ELEMENTS`; a tensor's byte
  length is what its shape, dtype and compression need, and the tensors fill the rest of the frame
  exactly.

JSON's ``NaN``, ``Infinity`` and ``-Infinity`` are read as floats, so they can only be the value of
a scalar (a label-private step's loss is NaN); with limits, the header holds no such value at all.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import Any, NoReturn, TypeGuard

import torch

__all__ = [
    "COMPRESSIONS",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_NAME_CHARS",
    "MAX_SCALARS",
    "MAX_TENSORS",
    "Frame",
    "FrameKind",
    "FrameLimits",
    "TensorSpec",
    "WireFormatError",
    "decode_frame",
    "encode_frame",
    "max_frame_bytes",
]

_HEADER_LENGTH = struct.Struct("<I")

# The dtypes a frame may carry, by their wire names. Anything else is refused on both sides.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_WIRE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}

COMPRESSIONS = ("none", "fp16", "bf16", "int8-row", "int8-tensor")
"""How floating-point tensors may travel: as they are (``"none"``), as float16 or bfloat16 (2 bytes
a value), or as int8 with a float32 scale per row (the first dimension, one example of a batch) or
per tensor (1 byte a value). int8 rounds to the nearest step of ``max|row| / 127``."""
_COMPRESSED = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SCALE = torch.float32
_FLOAT16_MAX = torch.finfo(torch.float16).max
_COMPRESSIBLE = (torch.float32, torch.float64)

MAX_HEADER_BYTES = 1 << 20
"""Most bytes of a frame's JSON header; :class:`FrameLimits` may allow fewer."""
MAX_HEADER_DEPTH = 16
"""Most levels of JSON nesting in a header (a valid header has four)."""
MAX_NAME_CHARS = 256
"""Most characters of a frame's kind, a tensor's name or a scalar's name."""
MAX_SCALARS = 1024
"""Most scalars of one frame; :class:`FrameLimits` may allow fewer."""
MAX_TENSORS = 1024
"""Most tensors of one frame."""
MAX_DIMS = 32
"""Most dimensions of a tensor's shape."""
MAX_DIMENSION = 2**31 - 1
"""Largest size of one dimension."""
MAX_ELEMENTS = 2**40
"""Largest product of a shape's dimensions, each zero counted as one."""
_MAX_INT_DIGITS = 20  # "-9223372036854775808": every 64-bit integer, and little more
_INT64 = 2**63

# How much of a compressed tensor is decoded at a time; bounds the scratch memory of decoding.
_CHUNK_VALUES = 1 << 20

Scalar = int | float | str | bool


class FrameKind:
    """The kinds of frame on the data plane."""

    FORWARD = "forward"
    """Client to server: cut-layer activations (smashed data) and labels of one batch."""
    BACKWARD = "backward"
    """Server to client: the gradient at the cut for that batch, with its loss."""
    ERROR = "error"
    """Server to client: the batch was refused; the ``error`` scalar says why."""
    # The label-private (U-shaped) split: two exchanges per batch, labels stay on the client.
    SMASHED = "smashed"
    """Client to server: cut-layer activations of one batch, without labels."""
    SERVER_OUTPUT = "server-output"
    """Server to client: the server half's output for that batch (the client head's input)."""
    OUTPUT_GRADIENT = "output-gradient"
    """Client to server: the gradient of the client's loss at the server half's output; the
    server answers with a ``BACKWARD`` frame (the gradient at the cut)."""
    # Evaluation: nothing is trained, nothing but the loss comes back.
    EVALUATE = "evaluate"
    """Client to server: activations and labels of one evaluation batch."""
    EVALUATION = "evaluation"
    """Server to client: the loss and correct count of that batch, without a gradient."""
    # Local-loss training: the client sends and goes on; nothing but an acknowledgement returns.
    ACTIVATIONS = "activations"
    """Client to server: cut-layer activations and labels of one batch, for the server half to
    train on; the client does not wait for the answer."""
    ACK = "ack"
    """Server to client: the server half trained on that batch; its loss and correct count as
    scalars, and no tensor."""


class WireFormatError(ValueError):
    """A frame could not be encoded or decoded."""


@dataclass
class Frame:
    """One data-plane message: a kind, the step it belongs to, tensors and scalars."""

    kind: str
    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)
    codecs: dict[str, str] = field(default_factory=dict)
    """Set by :func:`decode_frame`: the compression each tensor travelled with, if any."""


def validate_compression(compression: str) -> str:
    """Return ``compression`` if it is one of :data:`COMPRESSIONS`; raise otherwise."""
    if compression not in COMPRESSIONS:
        raise WireFormatError(
            f"unknown data-plane compression {compression!r}; use one of "
            f"{', '.join(repr(c) for c in COMPRESSIONS)}"
        )
    return compression


def wire_dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of ``dtype``, or raise if frames cannot carry it."""
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise WireFormatError(
            f"dtype {dtype} cannot travel on the data plane; use one of {', '.join(WIRE_DTYPES)}"
        ) from None


def encode_frame(frame: Frame, *, compression: str = "none") -> bytes:
    """Serialize ``frame`` into bytes.

    With a ``compression`` other than ``"none"``, every float32 and float64 tensor of the frame
    travels compressed (see :data:`COMPRESSIONS`); other tensors travel as they are.

    Raises
    ------
    WireFormatError
        If a tensor's dtype cannot travel, ``compression`` is unknown, or a tensor does not fit
        the compression: non-finite values with int8, values beyond float16's range with fp16.
    """
    validate_compression(compression)
    entries: list[list[Any]] = []
    buffers: list[Any] = []  # buffers: numpy arrays and bytes
    for name, tensor in frame.tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        dtype_name = wire_dtype_name(tensor.dtype)
        if (
            compression != "none"
            and tensor.dtype in (torch.float32, torch.float64)
            and tensor.numel()
        ):
            parts = _compress(name, tensor, compression)
            nbytes = sum(part.numel() * part.element_size() for part in parts)
            entries.append([name, dtype_name, list(tensor.shape), nbytes, compression])
            buffers.extend(part.reshape(-1).view(torch.uint8).numpy() for part in parts)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        entries.append([name, dtype_name, list(tensor.shape), nbytes])
        buffers.append(tensor.reshape(-1).view(torch.uint8).numpy() if nbytes else b"")
    header = json.dumps(
        {"kind": frame.kind, "step": frame.step, "scalars": frame.scalars, "tensors": entries},
        separators=(",", ":"),
    ).encode()
    return b"".join([_HEADER_LENGTH.pack(len(header)), header, *buffers])


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor of a frame may be, for :class:`FrameLimits`.

    Parameters
    ----------
    dtypes : frozenset[torch.dtype]
        The dtypes it may have once decoded; a compressed tensor counts as the dtype it decodes
        to (float32 or float64), whatever its codec.
    shape : tuple[int, ...]
        Its shape; with ``batch``, the shape of one example, without the batch dimension
        (``()`` for one label per example).
    batch : bool (default: True)
        Its first dimension is the batch: at most :attr:`FrameLimits.max_batch` examples, and as
        many in every batched tensor of a frame.
    required : bool (default: True)
        Every frame of a kind that lists it carries it.
    compressions : frozenset[str] (default: every one of :data:`COMPRESSIONS`)
        How it may travel; ``"none"`` is uncompressed. Only float32 and float64 tensors travel
        compressed, so the other codecs matter only for those dtypes.
    """

    dtypes: frozenset[torch.dtype]
    shape: tuple[int, ...]
    batch: bool = True
    required: bool = True
    compressions: frozenset[str] = frozenset(COMPRESSIONS)

    def __post_init__(self) -> None:
        dtypes = frozenset(self.dtypes)
        if not dtypes or any(dtype not in _WIRE_NAMES for dtype in dtypes):
            raise ValueError(
                f"a TensorSpec needs one or more of the dtypes frames carry "
                f"({', '.join(WIRE_DTYPES)}); got {sorted(map(str, dtypes))}"
            )
        shape = tuple(self.shape)
        if len(shape) + int(self.batch) > MAX_DIMS or not all(
            _is_int(d) and 0 <= d <= MAX_DIMENSION for d in shape
        ):
            raise ValueError(
                f"a TensorSpec's shape is a tuple of at most {MAX_DIMS - int(self.batch)} "
                f"integers in [0, 2**31); got {self.shape!r}"
            )
        compressions = frozenset(self.compressions)
        if not compressions or not compressions <= set(COMPRESSIONS):
            raise ValueError(
                f"a TensorSpec's compressions are one or more of {', '.join(COMPRESSIONS)}; got "
                f"{sorted(compressions)}"
            )
        if "none" not in compressions and not dtypes & set(_COMPRESSIBLE):
            raise ValueError(
                f"no tensor meets this TensorSpec: only float32 and float64 tensors travel "
                f"compressed, and its dtypes are {sorted(map(str, dtypes))}"
            )
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "compressions", compressions)

    def largest_wire_bytes(self, max_batch: int) -> int:
        """The most bytes this tensor takes in a frame, for batches of at most ``max_batch``."""
        shape = ((max_batch,) if self.batch else ()) + self.shape
        return max(
            _wire_bytes(dtype, shape, codec)
            for dtype in self.dtypes
            for codec in self.compressions
            if codec == "none" or dtype in _COMPRESSIBLE
        )


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts; :func:`decode_frame` checks a frame's header against it.

    Parameters
    ----------
    kinds : Mapping[str, Mapping[str, TensorSpec]]
        The kinds of frame accepted, each with the tensors a frame of that kind may carry, by
        name. A frame of another kind, or with a tensor its kind does not list, is refused.
    max_batch : int
        Most examples of one batch: the largest first dimension of a batched tensor.
    max_header_bytes : int (default: 65536)
        Most bytes of a frame's JSON header, at most :data:`MAX_HEADER_BYTES`.
    max_scalars : int (default: 16)
        Most scalars of one frame, at most :data:`MAX_SCALARS`.

    Examples
    --------
    A split server whose batches hold at most 256 examples of 16x4x4 float32 activations, with
    one integer label each:

    >>> limits = FrameLimits(
    ...     kinds={
    ...         FrameKind.FORWARD: {
    ...             "activations": TensorSpec(frozenset({torch.float32}), (16, 4, 4)),
    ...             "labels": TensorSpec(frozenset({torch.int64}), ()),
    ...         }
    ...     },
    ...     max_batch=256,
    ... )
    >>> max_frame_bytes(limits)
    329732
    """

    kinds: Mapping[str, Mapping[str, TensorSpec]]
    max_batch: int
    max_header_bytes: int = 64 * 1024
    max_scalars: int = 16
    _max_frame_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds: dict[str, Mapping[str, TensorSpec]] = {}
        for kind, specs in self.kinds.items():
            if not isinstance(kind, str) or len(kind) > MAX_NAME_CHARS:
                raise ValueError(
                    f"a frame kind is a string of at most {MAX_NAME_CHARS} characters; got "
                    f"{_show(kind)}"
                )
            if len(specs) > MAX_TENSORS or not all(
                isinstance(name, str) and len(name) <= MAX_NAME_CHARS for name in specs
            ):
                raise ValueError(
                    f"the {kind!r} frames of FrameLimits list at most {MAX_TENSORS} tensors "
                    f"named by strings of at most {MAX_NAME_CHARS} characters"
                )
            for name, spec in specs.items():
                if not isinstance(spec, TensorSpec):
                    raise TypeError(
                        f"tensor {name!r} of {kind!r} frames needs a TensorSpec, got "
                        f"{type(spec).__name__}"
                    )
            kinds[kind] = MappingProxyType(dict(specs))
        if not _is_int(self.max_batch) or self.max_batch < 0:
            raise ValueError(f"max_batch must be an integer >= 0; got {self.max_batch!r}")
        if not _is_int(self.max_header_bytes) or not 0 <= self.max_header_bytes <= (
            MAX_HEADER_BYTES
        ):
            raise ValueError(
                f"max_header_bytes must be an integer in [0, {MAX_HEADER_BYTES}]; got "
                f"{self.max_header_bytes!r}"
            )
        if not _is_int(self.max_scalars) or not 0 <= self.max_scalars <= MAX_SCALARS:
            raise ValueError(
                f"max_scalars must be an integer in [0, {MAX_SCALARS}]; got {self.max_scalars!r}"
            )
        body = max(
            (
                sum(spec.largest_wire_bytes(self.max_batch) for spec in specs.values())
                for specs in kinds.values()
            ),
            default=0,
        )
        object.__setattr__(self, "kinds", MappingProxyType(kinds))
        object.__setattr__(
            self, "_max_frame_bytes", _HEADER_LENGTH.size + self.max_header_bytes + body
        )


def max_frame_bytes(limits: FrameLimits) -> int:
    """The largest frame ``limits`` admit, in bytes.

    It counts the length prefix, the longest header allowed, and the largest tensors of a frame
    of any accepted kind holding the largest batch. :func:`decode_frame` refuses a larger frame
    before it reads it; a gRPC server can refuse it before it arrives, given this as
    ``grpc.max_receive_message_length``.
    """
    return limits._max_frame_bytes


def _wire_bytes(dtype: torch.dtype, shape: Sequence[int], codec: str) -> int:
    """The bytes a tensor of ``dtype`` and ``shape`` takes in a frame, travelling as ``codec``."""
    numel = math.prod(shape)
    if codec == "none":
        return numel * dtype.itemsize
    if codec in _COMPRESSED:
        return 2 * numel
    return _rows(shape, codec) * _SCALE.itemsize + numel


def decode_frame(
    data: bytes | bytearray | memoryview, *, limits: FrameLimits | None = None
) -> Frame:
    """Parse bytes made by :func:`encode_frame` into a :class:`Frame`.

    The header is read and checked first: against the bounds of this module, every entry's
    length, dtype, shape and compression against the bytes that arrived, and, given ``limits``,
    the frame's size, kind, scalars and every tensor against what the receiver accepts. Only a
    frame whose header passes has its tensors read, each straight from ``data`` into a tensor of
    its own (a compressed one decoded a chunk at a time, straight to its dtype): a refused frame
    costs no more memory than its header, an accepted one little more than its tensors. The
    tensors are writable and outlive ``data``.

    Parameters
    ----------
    data : bytes | bytearray | memoryview
        One frame.
    limits : FrameLimits | None (default: None)
        What the receiver accepts; ``None`` accepts any frame within this module's bounds.

    Returns
    -------
    Frame
        The frame's kind, step, tensors and scalars, and the compression each tensor travelled
        with (:attr:`Frame.codecs`).

    Raises
    ------
    WireFormatError
        If the frame is malformed, or outside ``limits``. Decoding raises nothing else, whatever
        ``data`` holds (bar running out of memory).
    """
    with memoryview(data) as given:
        view = _flat_bytes(given)
        try:
            layout = _read_header(view, limits)
            tensors = _read_tensors(view, layout.entries)
        except (WireFormatError, MemoryError):
            raise
        except Exception as err:  # a check this module lacks: still a refusal, and a short one
            raise WireFormatError(f"frame could not be decoded: {_describe(err)}") from err
        finally:
            view.release()
    return Frame(
        kind=layout.kind,
        step=layout.step,
        tensors=tensors,
        scalars=layout.scalars,
        codecs={entry.name: entry.codec for entry in layout.entries if entry.codec != "none"},
    )


@dataclass(frozen=True)
class _Entry:
    """A tensor entry of a header, checked: where its bytes are and what they decode to."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: str
    start: int
    """Offset of the tensor's first byte from the start of the frame."""


@dataclass(frozen=True)
class _Layout:
    kind: str
    step: int
    scalars: dict[str, Scalar]
    entries: list[_Entry]


def _flat_bytes(view: memoryview) -> memoryview:
    """``view`` as contiguous unsigned bytes, without a copy where it already is."""
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view[:]
    try:
        return view.cast("B")
    except TypeError:  # not contiguous, or a format memoryview cannot cast
        return memoryview(view.tobytes())


def _read_header(view: memoryview, limits: FrameLimits | None) -> _Layout:
    """Check everything a frame's header says; read none of its tensor bytes."""
    size = len(view)
    if limits is not None and size > limits._max_frame_bytes:
        raise WireFormatError(
            f"frame of {size} bytes is larger than the {limits._max_frame_bytes} bytes a frame "
            "may have here"
        )
    if size < _HEADER_LENGTH.size:
        raise WireFormatError(f"frame of {size} bytes is too short to hold a header")
    (header_length,) = _HEADER_LENGTH.unpack_from(view)
    longest = MAX_HEADER_BYTES if limits is None else limits.max_header_bytes
    if header_length > longest:
        raise WireFormatError(
            f"frame header of {header_length} bytes is longer than the {longest} bytes a header "
            "may have"
        )
    body_start = _HEADER_LENGTH.size + header_length
    if body_start > size:
        raise WireFormatError(
            f"frame header claims {header_length} bytes but the frame has {size} in all"
        )
    header = _parse_json(bytes(view[_HEADER_LENGTH.size : body_start]), finite=limits is not None)
    if not isinstance(header, dict):
        raise WireFormatError(f"frame header is not valid: expected an object, got {_show(header)}")
    for key in ("kind", "step"):
        if key not in header:
            raise WireFormatError(f"frame header is not valid: it has no {key!r}")
    kind, step = header["kind"], header["step"]
    if not isinstance(kind, str) or len(kind) > MAX_NAME_CHARS:
        raise WireFormatError(
            f"frame header is not valid: the kind must be a string of at most {MAX_NAME_CHARS} "
            f"characters, got {_show(kind)}"
        )
    if not _is_int(step) or not -_INT64 <= step < _INT64:
        raise WireFormatError(
            f"frame header is not valid: the step must be a 64-bit integer, got {_show(step)}"
        )
    specs: Mapping[str, TensorSpec] | None = None
    if limits is not None:
        specs = limits.kinds.get(kind)
        if specs is None:
            raise WireFormatError(
                f"frame kind {_show(kind)} is not accepted here; expected "
                f"{' or '.join(map(repr, limits.kinds)) or 'none'}"
            )
    scalars = _read_scalars(header.get("scalars", {}), limits)
    entries = header.get("tensors", [])
    if not isinstance(entries, list):
        raise WireFormatError(
            f"frame header is not valid: the tensors must be a list, got {_show(entries)}"
        )
    if len(entries) > MAX_TENSORS:  # under limits, the first tensor too many is refused by name
        raise WireFormatError(
            f"frame lists {len(entries)} tensors; at most {MAX_TENSORS} are accepted"
        )

    checked: list[_Entry] = []
    names: set[str] = set()
    batch: tuple[int, str] | None = None  # the frame's batch size, and the tensor that set it
    start = body_start
    for index, raw in enumerate(entries):
        entry, nbytes = _read_entry(index, raw)
        if entry.name in names:
            raise WireFormatError(f"tensor {_show(entry.name)} appears twice in the frame")
        names.add(entry.name)
        if limits is not None and specs is not None:
            examples = _check_spec(entry, kind, specs, limits)
            if examples is not None:
                if batch is None:
                    batch = (examples, entry.name)
                elif examples != batch[0]:
                    raise WireFormatError(
                        f"tensor {_show(entry.name)} holds a batch of {examples} examples, "
                        f"tensor {_show(batch[1])} one of {batch[0]}; the tensors of a frame "
                        "hold the same batch"
                    )
        if start + nbytes > size:
            raise WireFormatError(
                f"tensor {_show(entry.name)} runs past the end of the frame "
                f"({start + nbytes - body_start} > {size - body_start} bytes)"
            )
        checked.append(_Entry(entry.name, entry.dtype, entry.shape, entry.codec, start))
        start += nbytes
    if specs is not None:
        missing = [name for name, spec in specs.items() if spec.required and name not in names]
        if missing:
            raise WireFormatError(
                f"a {kind!r} frame carries {', '.join(map(repr, missing))}; this one does not"
            )
    if start != size:
        raise WireFormatError(
            f"frame carries {size - start} bytes that no tensor entry accounts for"
        )
    return _Layout(kind=kind, step=step, scalars=scalars, entries=checked)


def _read_scalars(scalars: object, limits: FrameLimits | None) -> dict[str, Scalar]:
    if not isinstance(scalars, dict):
        raise WireFormatError(
            f"frame header is not valid: the scalars must be an object, got {_show(scalars)}"
        )
    most = MAX_SCALARS if limits is None else limits.max_scalars
    if len(scalars) > most:
        raise WireFormatError(f"frame carries {len(scalars)} scalars; at most {most} are accepted")
    for name, value in scalars.items():
        if len(name) > MAX_NAME_CHARS:
            raise WireFormatError(
                f"scalar {_show(name)} has a name longer than {MAX_NAME_CHARS} characters"
            )
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise WireFormatError(
                f"scalar {_show(name)} is {_show(value)}; a scalar is a string, a number or a "
                "boolean"
            )
    return scalars


def _read_entry(index: int, entry: object) -> tuple[_Entry, int]:
    """Check one tensor entry on its own; return it (``start`` unset) and its byte length."""
    if not isinstance(entry, list) or len(entry) not in (4, 5):
        found = f"{len(entry)} fields" if isinstance(entry, list) else "not a list"
        raise WireFormatError(
            f"tensor entry {index} {_show(entry)} is not valid: it has {found}; an entry is "
            "[name, dtype, shape, byte length], with at most five fields, the fifth its "
            "compression"
        )
    name, dtype_name, shape, nbytes = entry[:4]
    codec = entry[4] if len(entry) == 5 else "none"
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        _invalid(index, entry, f"the name must be a string of at most {MAX_NAME_CHARS} characters")
    if not isinstance(dtype_name, str):
        _invalid(index, entry, "the dtype must be a string")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(_is_int, shape)):
        _invalid(index, entry, f"the shape must be a list of at most {MAX_DIMS} integers")
    if not _is_int(nbytes):
        _invalid(index, entry, "the byte length must be an integer")
    shown = _show(name)
    if len(entry) == 5 and codec not in _CODECS:
        raise WireFormatError(
            f"tensor {shown} travelled with compression {_show(codec)}; this version decodes "
            f"{', '.join(repr(c) for c in _CODECS)}"
        )
    dtype = WIRE_DTYPES.get(dtype_name)
    if codec != "none" and dtype not in _COMPRESSIBLE:
        raise WireFormatError(
            f"tensor {shown} is {_show(dtype_name)}; only float32 and float64 tensors travel "
            "compressed"
        )
    if dtype is None:
        raise WireFormatError(
            f"tensor {shown} has dtype {_show(dtype_name)}; frames carry {', '.join(WIRE_DTYPES)}"
        )
    if any(d < 0 for d in shape):
        raise WireFormatError(f"tensor {shown} has a negative dimension in shape {_show(shape)}")
    if any(d > MAX_DIMENSION for d in shape):
        raise WireFormatError(
            f"tensor {shown} has a dimension beyond 2**31 - 1 in shape {_show(shape)}"
        )
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise WireFormatError(f"tensor {shown} has shape {_show(shape)}, beyond 2**40 elements")
    expected = _wire_bytes(dtype, shape, codec)
    if codec == "none" and nbytes != expected:
        raise WireFormatError(
            f"tensor {shown}: shape {_show(shape)} of {dtype_name} needs {expected} bytes, "
            f"header says {nbytes}"
        )
    if codec != "none" and (nbytes != expected or not math.prod(shape)):
        raise WireFormatError(
            f"tensor {shown}: shape {_show(shape)} compressed as {codec} needs {expected} bytes "
            f"(and at least one value), header says {nbytes}"
        )
    return _Entry(name, dtype, tuple(shape), str(codec), -1), nbytes


def _invalid(index: int, entry: object, problem: str) -> NoReturn:
    raise WireFormatError(f"tensor entry {index} {_show(entry)} is not valid: {problem}")


def _check_spec(
    entry: _Entry, kind: str, specs: Mapping[str, TensorSpec], limits: FrameLimits
) -> int | None:
    """Check ``entry`` against its spec; return its batch size, if its spec has a batch."""
    shown = _show(entry.name)
    spec = specs.get(entry.name)
    if spec is None:
        raise WireFormatError(
            f"a {kind!r} frame carries no tensor {shown}; it carries "
            f"{', '.join(map(repr, specs)) or 'none'}"
        )
    if entry.dtype not in spec.dtypes:
        raise WireFormatError(
            f"tensor {shown} of a {kind!r} frame is {_WIRE_NAMES[entry.dtype]}; it must be "
            f"{' or '.join(sorted(_WIRE_NAMES[dtype] for dtype in spec.dtypes))}"
        )
    if entry.codec not in spec.compressions:
        raise WireFormatError(
            f"tensor {shown} of a {kind!r} frame travelled with compression {entry.codec!r}; "
            f"it may travel with {', '.join(sorted(map(repr, spec.compressions)))}"
        )
    if not spec.batch:
        if entry.shape != spec.shape:
            raise WireFormatError(
                f"tensor {shown} of a {kind!r} frame has shape {_show(list(entry.shape))}; it "
                f"must be {spec.shape}"
            )
        return None
    if entry.shape[1:] != spec.shape or not entry.shape:
        raise WireFormatError(
            f"tensor {shown} of a {kind!r} frame has shape {_show(list(entry.shape))}; it must "
            f"be (batch{''.join(f', {d}' for d in spec.shape)})"
        )
    if entry.shape[0] > limits.max_batch:
        raise WireFormatError(
            f"tensor {shown} of a {kind!r} frame holds a batch of {entry.shape[0]} examples; at "
            f"most {limits.max_batch} are accepted"
        )
    return entry.shape[0]


# -- the JSON header ---------------------------------------------------------------------------

_CODECS = COMPRESSIONS[1:]
# A JSON string, also an unterminated one (so that scanning stays linear in the header's length).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _parse_json(raw: bytes, *, finite: bool) -> Any:
    """The header's JSON value, parsed within this module's bounds; ``finite``: no NaN or
    infinity anywhere."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise WireFormatError(
            f"frame header is not valid: it is not UTF-8 text (byte {err.start} of {len(raw)})"
        ) from None
    if text.count("[") + text.count("{") > MAX_HEADER_DEPTH:
        brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
        if max(accumulate(map(_NESTING.__getitem__, map(ord, brackets))), default=0) > (
            MAX_HEADER_DEPTH
        ):
            raise WireFormatError(
                f"frame header is not valid: it nests deeper than {MAX_HEADER_DEPTH} levels"
            )
    constant: Callable[[str], float] = _no_constant if finite else float
    try:
        return json.loads(
            text,
            object_pairs_hook=_json_object,
            parse_int=_json_int,
            parse_float=_finite_float if finite else float,
            parse_constant=constant,
        )
    except RecursionError:
        raise WireFormatError(
            f"frame header is not valid: it nests deeper than {MAX_HEADER_DEPTH} levels"
        ) from None
    except json.JSONDecodeError as err:
        raise WireFormatError(f"frame header is not valid: {_clip(str(err))}") from None


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WireFormatError(
                    f"frame header is not valid: key {_show(key)} appears twice in an object"
                )
            seen.add(key)
    return result


def _json_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise WireFormatError(
            f"frame header is not valid: an integer of {len(text)} characters is beyond 64 bits"
        )
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireFormatError(
            f"frame header is not valid: the number {_show(text)} is beyond a float's range"
        )
    return value


def _no_constant(text: str) -> float:
    raise WireFormatError(f"frame header is not valid: {_show(text)} is not accepted here")


# -- echoing what arrived ----------------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = 8
_REPR.maxdict = 4
_REPR.maxstring = 60
_REPR.maxlong = 40
_REPR.maxother = 60
_ECHO_CHARS = 120
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _clip(text: str) -> str:
    return text if len(text) <= _ECHO_CHARS else text[: _ECHO_CHARS - 3] + "..."


def _show(value: object) -> str:
    """A short excerpt of ``value``, as a message may echo it."""
    return _clip(_REPR.repr(value))


def _describe(err: BaseException) -> str:
    """The type and first line of ``err``, without a native backtrace or addresses."""
    lines = str(err).split("Exception raised from", 1)[0].strip().splitlines()
    first = _ADDRESS.sub("<address>", lines[0]) if lines else ""
    return _clip(f"{type(err).__name__}: {first}" if first else type(err).__name__)


# -- the tensor bytes ---------------------------------------------------------------------------


def _read_tensors(view: memoryview, entries: list[_Entry]) -> dict[str, torch.Tensor]:
    """Decode the tensors of a checked header from ``view``, each into storage of its own."""
    scales = {
        entry.name: _read_scales(view, entry) for entry in entries if entry.codec in _INT8_CODECS
    }
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.codec == "none":
            _copy_bytes(view, entry.start, tensor)
        elif entry.codec in _COMPRESSED:
            _decode_half(view, entry.start, tensor, _COMPRESSED[entry.codec])
        else:
            row_scales = scales[entry.name]
            values_start = entry.start + row_scales.numel() * _SCALE.itemsize
            _decode_int8(view, values_start, tensor, row_scales)
        tensors[entry.name] = tensor
    return tensors


_INT8_CODECS = ("int8-row", "int8-tensor")


def _copy_bytes(view: memoryview, start: int, tensor: torch.Tensor) -> None:
    """Fill the contiguous ``tensor`` with the bytes of ``view`` from ``start``."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        target = tensor.reshape(-1).view(torch.uint8).numpy().data
        target[:] = view[start : start + nbytes]


def _read_scales(view: memoryview, entry: _Entry) -> torch.Tensor:
    scales = torch.empty(_rows(entry.shape, entry.codec), dtype=_SCALE)
    _copy_bytes(view, entry.start, scales)
    if not bool((scales.isfinite() & (scales > 0)).all()):
        raise WireFormatError(
            f"tensor {_show(entry.name)} carries int8 scales that are not finite and positive"
        )
    return scales


def _decode_half(view: memoryview, start: int, out: torch.Tensor, half: torch.dtype) -> None:
    """Fill ``out`` with the 16-bit floats of ``view`` from ``start``, a chunk at a time."""
    flat = out.reshape(-1)
    numel = flat.numel()
    chunk = torch.empty(min(numel, _CHUNK_VALUES), dtype=half)
    for first in range(0, numel, _CHUNK_VALUES):
        part = chunk[: min(_CHUNK_VALUES, numel - first)]
        _copy_bytes(view, start + first * half.itemsize, part)
        flat[first : first + part.numel()].copy_(part)


def _decode_int8(view: memoryview, start: int, out: torch.Tensor, scales: torch.Tensor) -> None:
    """Fill ``out`` with the int8 values of ``view`` from ``start`` times their row's scale, a
    chunk at a time: each value is ``float32(value) * scale``, then cast to ``out``'s dtype."""
    rows = scales.numel()
    columns = out.numel() // rows
    grid = out.view(rows, columns)
    rows_at_once = max(1, _CHUNK_VALUES // columns)
    columns_at_once = min(columns, _CHUNK_VALUES)
    size = min(out.numel(), _CHUNK_VALUES)
    values = torch.empty(size, dtype=torch.int8)
    floats = torch.empty(size, dtype=_SCALE)
    for row in range(0, rows, rows_at_once):
        height = min(rows_at_once, rows - row)
        for column in range(0, columns, columns_at_once):
            width = min(columns_at_once, columns - column)
            part = values[: height * width]
            _copy_bytes(view, start + row * columns + column, part)
            product = floats[: height * width].view(height, width)
            product.copy_(part.view(height, width))  # exact: every int8 is a float32
            target = grid[row : row + height, column : column + width]
            row_scales = scales[row : row + height, None]
            if out.dtype == _SCALE:
                torch.mul(product, row_scales, out=target)
            else:
                target.copy_(product.mul_(row_scales))


def _rows(shape: Sequence[int], compression: str) -> int:
    """How many int8 scales a tensor of ``shape`` carries."""
    return shape[0] if compression == "int8-row" and len(shape) >= 1 else 1


def _compress(name: str, tensor: torch.Tensor, compression: str) -> list[torch.Tensor]:
    """The wire parts of a float tensor: its values in 16 bits, or int8 scales then values."""
    if compression in _COMPRESSED:
        half = tensor.to(_COMPRESSED[compression])
        if (
            compression == "fp16"
            and bool(tensor.isfinite().all())
            and not bool(half.isfinite().all())
        ):
            raise WireFormatError(
                f"tensor {name!r} holds values beyond float16's range (+-{_FLOAT16_MAX:g}); "
                "use data-plane compression 'bf16', which keeps float32's range"
            )
        return [half]
    rows = tensor.reshape(_rows(tensor.shape, compression), -1).float()
    if not bool(rows.isfinite().all()):
        raise WireFormatError(
            f"tensor {name!r} holds NaN or infinity, which int8 compression cannot carry: the "
            "client half diverged or its input is not finite (lower the learning rate, check the "
            "data)"
        )
    scales = rows.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(rows / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return [scales.to(_SCALE), values]
