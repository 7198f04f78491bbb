"""The data plane's wire format: one frame per message, tensors as raw bytes.

A frame is ``[u32 header length][JSON header][tensor bytes ...]``. The header names the frame's
kind and step, carries a few scalars, and lists each tensor's name, dtype, shape and byte length;
the tensor bytes follow in that order, in native (little-endian) byte order. Nothing is pickled, so
decoding a frame from an untrusted peer can fail but cannot run code.

Floating-point tensors may travel compressed (:data:`COMPRESSIONS`): the tensor's entry then has a
fifth field naming the codec, its dtype and shape stay those of the tensor it decodes to, and its
byte length is what crossed the wire. A frame without compression is byte for byte what it was
before compression existed, and decodes to exactly the tensors that were encoded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "COMPRESSIONS",
    "Frame",
    "FrameKind",
    "WireFormatError",
    "decode_frame",
    "encode_frame",
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


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse bytes made by :func:`encode_frame` into a :class:`Frame`.

    Every length and dtype in the header is checked against the bytes that arrived; a frame that
    does not add up raises :class:`WireFormatError` and no tensor is built from it. The tensors own
    a private copy of their bytes, so they are writable and outlive ``data``.
    """
    view = memoryview(data)
    if len(view) < _HEADER_LENGTH.size:
        raise WireFormatError(f"frame of {len(view)} bytes is too short to hold a header")
    (header_length,) = _HEADER_LENGTH.unpack_from(view)
    body_start = _HEADER_LENGTH.size + header_length
    if body_start > len(view):
        raise WireFormatError(
            f"frame header claims {header_length} bytes but the frame has {len(view)} in all"
        )
    try:
        header = json.loads(bytes(view[_HEADER_LENGTH.size : body_start]))
        kind, step = header["kind"], header["step"]
        scalars = header.get("scalars", {})
        entries = header.get("tensors", [])
    except (ValueError, KeyError, TypeError) as err:
        raise WireFormatError(f"frame header is not valid: {err}") from err
    if not (
        isinstance(kind, str)
        and isinstance(step, int)
        and not isinstance(step, bool)
        and isinstance(scalars, dict)
        and isinstance(entries, list)
    ):
        raise WireFormatError(
            "frame header is not valid: expected a string kind, an integer step, a scalars "
            f"object and a tensors list; got {header!r:.200}"
        )

    payload = bytearray(view[body_start:])  # one copy; tensors below are views into it
    tensors: dict[str, torch.Tensor] = {}
    codecs: dict[str, str] = {}
    offset = 0
    for entry in entries:
        try:
            name, dtype_name, shape, nbytes, *codec = entry
            shape = [int(d) for d in shape]
            nbytes = int(nbytes)
            if len(codec) > 1:
                raise ValueError("an entry has at most five fields")
        except (ValueError, TypeError) as err:
            raise WireFormatError(f"tensor entry {entry!r} is not valid: {err}") from err
        if not isinstance(name, str) or not isinstance(dtype_name, str):
            raise WireFormatError(f"tensor entry {entry!r} needs a string name and dtype")
        if codec:
            tensors[name] = _decode_compressed(
                name, dtype_name, shape, nbytes, codec[0], payload, offset
            )
            codecs[name] = codec[0]
            offset += nbytes
            continue
        if dtype_name not in WIRE_DTYPES:
            raise WireFormatError(
                f"tensor {name!r} has dtype {dtype_name!r}; frames carry {', '.join(WIRE_DTYPES)}"
            )
        dtype = WIRE_DTYPES[dtype_name]
        if any(d < 0 for d in shape):
            raise WireFormatError(f"tensor {name!r} has a negative dimension in shape {shape}")
        numel = math.prod(shape)
        if nbytes != numel * dtype.itemsize:
            raise WireFormatError(
                f"tensor {name!r}: shape {shape} of {dtype_name} needs "
                f"{numel * dtype.itemsize} bytes, header says {nbytes}"
            )
        _check_room(name, payload, offset, nbytes)
        tensors[name] = _read(payload, offset, dtype, numel).reshape(shape)
        offset += nbytes
    if offset != len(payload):
        raise WireFormatError(
            f"frame carries {len(payload) - offset} bytes that no tensor entry accounts for"
        )
    return Frame(kind=kind, step=step, tensors=tensors, scalars=scalars, codecs=codecs)


def _check_room(name: str, payload: bytearray, offset: int, nbytes: int) -> None:
    if offset + nbytes > len(payload):
        raise WireFormatError(
            f"tensor {name!r} runs past the end of the frame "
            f"({offset + nbytes} > {len(payload)} bytes)"
        )


def _read(payload: bytearray, offset: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """``numel`` values of ``dtype`` at ``offset``, as a flat tensor over ``payload``."""
    if not numel:
        return torch.empty(0, dtype=dtype)
    if offset % dtype.itemsize:  # keep every tensor aligned to its element size
        chunk = bytearray(payload[offset : offset + numel * dtype.itemsize])
        return torch.frombuffer(chunk, dtype=dtype, count=numel)
    return torch.frombuffer(payload, dtype=dtype, count=numel, offset=offset)


def _rows(shape: list[int] | torch.Size, compression: str) -> int:
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


def _decode_compressed(
    name: str,
    dtype_name: str,
    shape: list[int],
    nbytes: int,
    compression: object,
    payload: bytearray,
    offset: int,
) -> torch.Tensor:
    if compression not in COMPRESSIONS or compression == "none":
        raise WireFormatError(
            f"tensor {name!r} travelled with compression {compression!r}; this version decodes "
            f"{', '.join(repr(c) for c in COMPRESSIONS[1:])}"
        )
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype not in (torch.float32, torch.float64):
        raise WireFormatError(
            f"tensor {name!r} is {dtype_name!r}; only float32 and float64 tensors travel compressed"
        )
    if any(d < 0 for d in shape):
        raise WireFormatError(f"tensor {name!r} has a negative dimension in shape {shape}")
    numel = math.prod(shape)
    if compression in _COMPRESSED:
        expected, scale_count = 2 * numel, 0
    else:
        scale_count = _rows(shape, compression)
        expected = scale_count * _SCALE.itemsize + numel
    if nbytes != expected or not numel:
        raise WireFormatError(
            f"tensor {name!r}: shape {shape} compressed as {compression} needs {expected} bytes "
            f"(and at least one value), header says {nbytes}"
        )
    _check_room(name, payload, offset, nbytes)
    if compression in _COMPRESSED:
        values = _read(payload, offset, _COMPRESSED[compression], numel)
        return values.to(dtype).reshape(shape)
    scales = _read(payload, offset, _SCALE, scale_count)
    if not bool((scales.isfinite() & (scales > 0)).all()):
        raise WireFormatError(
            f"tensor {name!r} carries int8 scales that are not finite and positive"
        )
    values = _read(payload, offset + scale_count * _SCALE.itemsize, torch.int8, numel)
    decoded = values.reshape(scale_count, -1).to(torch.float32) * scales[:, None]
    return decoded.to(dtype).reshape(shape)
