"""Fuzzing the frame decoder: whatever the bytes, a frame decodes or is refused cleanly.

Random bytes, random JSON headers, structure-aware mutations of valid frames and frames near a
receiver's limits must each either decode (to tensors within the limits, when given) or raise
:class:`WireFormatError` with a short message, never another exception; random valid frames
round-trip exactly. The runs are deterministic. A longer run, which prints how many inputs it
tried and every problem it found::

    python tests/fuzz_wire.py --examples 1000000 --seconds 600
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitfed.wire import (
    COMPRESSIONS,
    WIRE_DTYPES,
    Frame,
    FrameKind,
    FrameLimits,
    TensorSpec,
    WireFormatError,
    decode_frame,
    encode_frame,
)

from . import fuzz_wire
from .fuzz_wire import EXTREME_LITERALS, check_one, limits_violation, problem_with

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64 = st.integers(-(2**63), 2**63 - 1)
NAMES = st.one_of(st.sampled_from(["activations", "labels", "gradient", "x"]), st.text(max_size=8))
SCALARS = st.one_of(INT64, st.floats(), st.text(max_size=12), st.booleans())
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), INT64, st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def tensors(
    draw: st.DrawFn, dtype: torch.dtype | None = None, shape: list[int] | None = None
) -> torch.Tensor:
    """A tensor of any wire dtype whose bytes are random (NaN payloads, -0.0 and all)."""
    dtype = draw(st.sampled_from(list(WIRE_DTYPES.values()))) if dtype is None else dtype
    shape = draw(st.lists(st.integers(0, 4), max_size=3)) if shape is None else shape
    nbytes = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        tensor = tensor.remainder(2)
    return tensor.view(dtype).reshape(shape)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.one_of(st.sampled_from(fuzz_wire.KINDS), st.text(max_size=12)))
    return Frame(
        kind,
        draw(INT64),
        tensors=draw(st.dictionaries(NAMES, tensors(), max_size=4)),
        scalars=draw(st.dictionaries(st.text(max_size=8), SCALARS, max_size=4)),
    )


def reference_encoding(frame: Frame) -> bytes:
    """The wire format written out by hand: the bytes :func:`encode_frame` must keep making."""
    entries, payload = [], b""
    for name, tensor in frame.tensors.items():
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        entries[-1].append(len(data))
        payload += data
    header = {"kind": frame.kind, "step": frame.step, "scalars": frame.scalars, "tensors": entries}
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(text)) + text + payload


def same_scalar(actual: object, expected: object) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return type(actual) is type(expected) and actual == expected


def assert_refused_cleanly(data: bytes, limits: FrameLimits | None = None) -> Frame | None:
    """Decode ``data``: return its frame, or ``None`` if it was refused cleanly."""
    try:
        frame = decode_frame(data, limits=limits)
    except Exception as error:  # every exception is looked at, none may pass unseen
        problem = problem_with(error, data)
        assert problem is None, problem
        return None
    if limits is not None:
        violation = limits_violation(frame, limits)
        assert violation is None, f"accepted outside the limits: {violation}"
    return frame


# -- (c) valid frames round-trip ---------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(frame=frames())
def test_random_frames_keep_their_bytes_and_round_trip_exactly(frame: Frame) -> None:
    data = encode_frame(frame)
    assert data == reference_encoding(frame)
    decoded = decode_frame(data)
    assert (decoded.kind, decoded.step, decoded.codecs) == (frame.kind, frame.step, {})
    assert list(decoded.scalars) == list(frame.scalars)
    for name, value in frame.scalars.items():
        assert same_scalar(decoded.scalars[name], value), name
    assert list(decoded.tensors) == list(frame.tensors)
    for name, tensor in frame.tensors.items():
        got = decoded.tensors[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape)
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(FUZZ, max_examples=200)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shape=st.lists(st.integers(1, 5), max_size=3),
    codec=st.sampled_from(COMPRESSIONS[1:]),
    data=st.data(),
)
def test_random_compressed_frames_decode_to_their_codec_values(
    dtype: torch.dtype, shape: list[int], codec: str, data: st.DataObject
) -> None:
    values = data.draw(st.lists(FINITE, min_size=math.prod(shape), max_size=math.prod(shape)))
    tensor = torch.tensor(values, dtype=dtype).reshape(shape)
    frame = Frame(FrameKind.FORWARD, 1, tensors={"x": tensor, "y": torch.arange(3)})
    decoded = decode_frame(encode_frame(frame, compression=codec))
    got = decoded.tensors["x"]
    assert (got.dtype, got.shape, decoded.codecs) == (dtype, tensor.shape, {"x": codec})
    assert torch.equal(decoded.tensors["y"], torch.arange(3))
    if codec in ("fp16", "bf16"):
        half = torch.float16 if codec == "fp16" else torch.bfloat16
        assert torch.equal(got, tensor.to(half).to(dtype))
    else:
        rows = tensor.reshape(tensor.shape[0] if codec == "int8-row" and shape else 1, -1).float()
        step = rows.abs().amax(dim=1, keepdim=True) / 127
        error = (got.float().reshape(rows.shape) - rows).abs()
        assert bool((error <= step * 0.5 * (1 + 1e-5) + 1e-30).all())


# -- (a) random bytes ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    assert_refused_cleanly(data)


@settings(FUZZ, max_examples=300)
@given(
    header=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
    payload=st.binary(max_size=64),
)
def test_random_headers_behind_a_right_length_prefix_are_refused_cleanly(
    header: bytes, payload: bytes
) -> None:
    assert_refused_cleanly(struct.pack("<I", len(header)) + header + payload)


@settings(FUZZ, max_examples=300)
@given(header=JSON_VALUES, payload=st.binary(max_size=64))
def test_random_json_headers_are_refused_cleanly(header: Any, payload: bytes) -> None:
    text = json.dumps(header).encode()
    assert_refused_cleanly(struct.pack("<I", len(text)) + text + payload)


# -- (b) mutations of valid frames ---------------------------------------------------------------


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid frame with one field of its header replaced by a random JSON value or an extreme
    literal (a number out of range, NaN, deep nesting, ...)."""
    frame = draw(frames())
    codec = draw(st.sampled_from(COMPRESSIONS))
    header, payload = fuzz_wire.split_frame(fuzz_wire.encode(frame, codec))
    places: list[tuple[Any, Any]] = [(header, key) for key in ("kind", "step", "scalars")]
    places.append((header, "tensors"))
    for entry in header["tensors"]:
        places += [(entry, index) for index in range(len(entry))]
        places += [(entry[2], index) for index in range(len(entry[2]))]
    container, key = draw(st.sampled_from(places))
    marker = "\u0001marker\u0001"
    container[key] = marker
    text = json.dumps(header)
    replacement = draw(st.one_of(st.sampled_from(EXTREME_LITERALS), JSON_VALUES.map(json.dumps)))
    text = text.replace(json.dumps(marker), replacement, 1)
    return fuzz_wire.join_frame(text, payload)


@settings(FUZZ, max_examples=600)
@given(data=mutated_headers())
def test_frames_with_a_field_replaced_are_refused_cleanly(data: bytes) -> None:
    assert_refused_cleanly(data)


@settings(FUZZ, max_examples=600)
@given(frame=frames(), codec=st.sampled_from(COMPRESSIONS), seed=st.integers(0, 2**32))
def test_frames_mutated_or_damaged_are_refused_cleanly(frame: Frame, codec: str, seed: int) -> None:
    rng = random.Random(seed)
    data = fuzz_wire.encode(frame, codec)
    header, payload = fuzz_wire.split_frame(data)
    mutated = fuzz_wire.join_frame(fuzz_wire.mutate_header(rng, header), payload)
    assert_refused_cleanly(mutated)
    assert_refused_cleanly(fuzz_wire.damage_bytes(rng, data))


@settings(FUZZ, max_examples=200)
@given(frame=frames(), cut=st.integers(0, 2**16))
def test_truncated_frames_are_refused(frame: Frame, cut: int) -> None:
    data = encode_frame(frame)
    with pytest.raises(WireFormatError) as caught:
        decode_frame(data[: cut % len(data)])
    assert problem_with(caught.value, data) is None


# -- (d) limits ----------------------------------------------------------------------------------


@st.composite
def limits_and_frames(draw: st.DrawFn) -> tuple[FrameLimits, bytes]:
    """Limits of a split server, and a frame that meets them or misses them by a little."""
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    dtypes = draw(st.frozensets(st.sampled_from([torch.float32, torch.float64]), min_size=1))
    compressions = draw(st.frozensets(st.sampled_from(COMPRESSIONS), min_size=1))
    limits = FrameLimits(
        kinds={
            FrameKind.FORWARD: {
                "activations": TensorSpec(dtypes, shape, compressions=compressions),
                "labels": TensorSpec(frozenset({torch.int64}), ()),
            }
        },
        max_batch=draw(st.integers(0, 4)),
        max_scalars=draw(st.integers(0, 2)),
    )
    batch = draw(st.integers(0, limits.max_batch + 1))
    act_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    act_shape = draw(st.sampled_from([[batch, *shape], [batch, *shape, 1], [batch + 1, *shape]]))
    label_shape = draw(st.sampled_from([[batch], [batch, 1], [batch + 1]]))
    tensors = {
        "activations": draw(tensors_of(act_dtype, act_shape)),
        "labels": draw(tensors_of(torch.int64, label_shape)),
    }
    if draw(st.booleans()):
        tensors.pop(draw(st.sampled_from(["activations", "labels"])))
    kind = draw(st.sampled_from([FrameKind.FORWARD, FrameKind.FORWARD, FrameKind.SMASHED]))
    scalars = draw(st.dictionaries(st.text(max_size=4), SCALARS, max_size=3))
    frame = Frame(kind, draw(INT64), tensors=tensors, scalars=scalars)
    data = fuzz_wire.encode(frame, draw(st.sampled_from(COMPRESSIONS)))
    damage = draw(st.integers(0, 3))
    if damage:
        rng = random.Random(draw(st.integers(0, 2**32)))
        if damage == 1:
            header, payload = fuzz_wire.split_frame(data)
            data = fuzz_wire.join_frame(fuzz_wire.mutate_header(rng, header), payload)
        elif damage == 2:
            data = fuzz_wire.damage_bytes(rng, data)
    return limits, data


def tensors_of(dtype: torch.dtype, shape: list[int]) -> st.SearchStrategy[torch.Tensor]:
    return tensors(dtype=dtype, shape=shape)


@settings(FUZZ, max_examples=800)
@given(case=limits_and_frames())
def test_frames_under_limits_decode_within_them_or_are_refused_cleanly(
    case: tuple[FrameLimits, bytes],
) -> None:
    limits, data = case
    assert_refused_cleanly(data, limits)


@settings(FUZZ, max_examples=800)
@given(seed=st.integers(0, 2**32))
def test_random_limits_and_inputs_decode_within_them_or_are_refused_cleanly(seed: int) -> None:
    rng = random.Random(seed)
    data, limits = fuzz_wire.random_input(rng)
    _, problem, _ = check_one(data, limits)
    assert problem is None, problem
