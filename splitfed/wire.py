"""The data plane's wire format: one frame per message, tensors as raw bytes.

A frame is ``[u32 header length][JSON header][tensor bytes ...]``. The header names the frame's
kind and step, carries a few scalars, and lists each tensor's name, dtype, shape and byte length;
the tensor bytes follow in that order, in native (little-endian) byte order. Nothing is pickled, so
decoding a frame from an untrusted peer can fail but cannot run code.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

__all__ = ["Frame", "FrameKind", "WireFormatError", "decode_frame", "encode_frame"]

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


class WireFormatError(ValueError):
    """A frame could not be encoded or decoded."""


@dataclass
class Frame:
    """One data-plane message: a kind, the step it belongs to, tensors and scalars."""

    kind: str
    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)


def wire_dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of ``dtype``, or raise if frames cannot carry it."""
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise WireFormatError(
            f"dtype {dtype} cannot travel on the data plane; use one of {', '.join(WIRE_DTYPES)}"
        ) from None


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` into bytes."""
    entries = []
    buffers = []
    for name, tensor in frame.tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        dtype_name = wire_dtype_name(tensor.dtype)
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
    offset = 0
    for entry in entries:
        try:
            name, dtype_name, shape, nbytes = entry
            shape = [int(d) for d in shape]
            nbytes = int(nbytes)
        except (ValueError, TypeError) as err:
            raise WireFormatError(f"tensor entry {entry!r} is not valid: {err}") from err
        if not isinstance(name, str) or not isinstance(dtype_name, str):
            raise WireFormatError(f"tensor entry {entry!r} needs a string name and dtype")
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
        if offset + nbytes > len(payload):
            raise WireFormatError(
                f"tensor {name!r} runs past the end of the frame "
                f"({offset + nbytes} > {len(payload)} bytes)"
            )
        if not numel:
            flat = torch.empty(0, dtype=dtype)
        elif offset % dtype.itemsize:  # keep every tensor aligned to its element size
            chunk = bytearray(payload[offset : offset + nbytes])
            flat = torch.frombuffer(chunk, dtype=dtype, count=numel)
        else:
            flat = torch.frombuffer(payload, dtype=dtype, count=numel, offset=offset)
        tensors[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(payload):
        raise WireFormatError(
            f"frame carries {len(payload) - offset} bytes that no tensor entry accounts for"
        )
    return Frame(kind=kind, step=step, tensors=tensors, scalars=scalars)
