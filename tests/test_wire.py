"""The data plane's wire format: frames round-trip tensors exactly and refuse malformed bytes.

A frame is ``[u32 header length][JSON header][tensor bytes ...]``. Decoding must give back the same
values, dtypes and shapes that were encoded, as writable tensors of their own, and any frame that
does not add up must raise :class:`WireFormatError` with a message that says what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
import warnings

import pytest
import torch

from splitfed.wire import (
    WIRE_DTYPES,
    Frame,
    FrameKind,
    WireFormatError,
    decode_frame,
    encode_frame,
)


def sample_values(dtype: torch.dtype) -> torch.Tensor:
    """Twelve values of ``dtype`` that include its extremes and, for floats, its special values."""
    if dtype == torch.bool:
        return torch.tensor(
            [True, False, False, True, True, True, False, True, False, False, True, False]
        )
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        values = [
            1.5,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            info.max,
            info.min,
            info.tiny,
            info.eps,
            -2.25,
            3.0,
            0.1,
        ]
        return torch.tensor(values, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.tensor(
        [
            info.min,
            info.max,
            0,
            1,
            -1 if info.min < 0 else 2,
            7,
            info.max - 1,
            info.min + 1,
            3,
            100,
            5,
            11,
        ],
        dtype=dtype,
    )


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bytes (so NaN and -0.0 count as equal to themselves)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    actual_bytes = actual.contiguous().reshape(-1).view(torch.uint8)
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual_bytes, expected_bytes)


def round_trip(tensors: dict[str, torch.Tensor], **scalars) -> Frame:
    return decode_frame(encode_frame(Frame(FrameKind.FORWARD, 7, tensors=tensors, scalars=scalars)))


def raw_frame(header: object, body: bytes = b"") -> bytes:
    """A frame built by hand, so that it can be wrong in ways encode_frame never is."""
    header_bytes = json.dumps(header).encode()
    return struct.pack("<I", len(header_bytes)) + header_bytes + body


def forward_header(*entries: list) -> dict:
    return {"kind": FrameKind.FORWARD, "step": 1, "scalars": {}, "tensors": list(entries)}


DTYPE_IDS = list(WIRE_DTYPES)
DTYPES = list(WIRE_DTYPES.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_round_trip_keeps_values_dtype_and_shape_of_every_wire_dtype(dtype: torch.dtype) -> None:
    tensor = sample_values(dtype).reshape(3, 4)
    decoded = round_trip({"x": tensor}).tensors["x"]
    assert_identical(decoded, tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_round_trip_keeps_zero_dimensional_tensors(dtype: torch.dtype) -> None:
    tensor = sample_values(dtype)[0].clone()
    assert tensor.dim() == 0
    decoded = round_trip({"x": tensor}).tensors["x"]
    assert decoded.shape == torch.Size([])
    assert_identical(decoded, tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 5)], ids=str)
def test_round_trip_keeps_empty_tensors_with_their_shape(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    tensor = torch.empty(shape, dtype=dtype)
    decoded = round_trip({"x": tensor}).tensors["x"]
    assert decoded.dtype == dtype
    assert decoded.shape == torch.Size(shape)
    assert decoded.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_round_trip_of_non_contiguous_tensors_gives_their_logical_values(
    dtype: torch.dtype,
) -> None:
    base = sample_values(dtype).reshape(3, 4)
    views = {"transposed": base.t(), "strided": base[:, ::2], "expanded": base[0].expand(2, 4)}
    assert not any(view.is_contiguous() for view in views.values())
    decoded = round_trip(views).tensors
    for name, view in views.items():
        assert_identical(decoded[name], view.contiguous())


def test_round_trip_keeps_several_tensors_by_name_in_order() -> None:
    tensors = {
        "activations": torch.randn(4, 2, 3),
        "labels": torch.tensor([3, 1, 4, 1]),
        "mask": torch.tensor([True, False, True, True]),
    }
    decoded = round_trip(tensors).tensors
    assert list(decoded) == list(tensors)
    for name, tensor in tensors.items():
        assert_identical(decoded[name], tensor)


def test_round_trip_keeps_kind_step_and_scalar_types() -> None:
    scalars = {"loss": 0.25, "whole": 1.0, "correct": 3, "ok": True, "error": "bad batch"}
    frame = Frame(FrameKind.BACKWARD, 42, tensors={}, scalars=scalars)
    decoded = decode_frame(encode_frame(frame))
    assert decoded.kind == FrameKind.BACKWARD
    assert decoded.step == 42
    assert decoded.scalars == scalars
    assert {k: type(v) for k, v in decoded.scalars.items()} == {
        k: type(v) for k, v in scalars.items()
    }
    assert decoded.tensors == {}


def test_encode_accepts_tensors_that_require_grad() -> None:
    tensor = torch.randn(2, 3, requires_grad=True) * 2
    decoded = round_trip({"x": tensor}).tensors["x"]
    assert not decoded.requires_grad
    assert_identical(decoded, tensor.detach())


@pytest.mark.parametrize("container", [bytes, bytearray, memoryview], ids=lambda c: c.__name__)
def test_decoded_tensors_are_writable_without_warnings(container: type) -> None:
    data = container(encode_frame(Frame(FrameKind.FORWARD, 1, tensors={"x": torch.zeros(3)})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = decode_frame(data).tensors["x"]
        tensor += 1
    assert torch.equal(tensor, torch.ones(3))


def test_decoded_tensors_do_not_change_when_the_input_buffer_changes() -> None:
    original = torch.arange(8, dtype=torch.int64)
    data = bytearray(encode_frame(Frame(FrameKind.FORWARD, 1, tensors={"x": original})))
    tensor = decode_frame(data).tensors["x"]
    data[-64:] = b"\xff" * 64
    assert torch.equal(tensor, original)


def test_writing_a_decoded_tensor_leaves_the_input_buffer_and_other_tensors_alone() -> None:
    data = bytearray(
        encode_frame(Frame(FrameKind.FORWARD, 1, tensors={"a": torch.zeros(4), "b": torch.ones(4)}))
    )
    before = bytes(data)
    tensors = decode_frame(data).tensors
    tensors["a"].fill_(9.0)
    assert bytes(data) == before
    assert torch.equal(tensors["b"], torch.ones(4))
    assert torch.equal(decode_frame(data).tensors["a"], torch.zeros(4))


@pytest.mark.parametrize(
    ("odd", "aligned"),
    [
        (torch.tensor([1, -2, 3], dtype=torch.int8), torch.tensor([2**40, -(2**62), 5])),
        (
            torch.tensor([True, False, True, True, False]),
            torch.tensor([1.5, -2.5], dtype=torch.float64),
        ),
        (torch.tensor([7], dtype=torch.uint8), torch.tensor([1.25, 2.5, -3.75])),
        (torch.tensor([1.5], dtype=torch.float16), torch.tensor([2**40, 3], dtype=torch.int64)),
        (
            torch.tensor([1, 2, 3], dtype=torch.int16),
            torch.tensor([70000, -70000], dtype=torch.int32),
        ),
    ],
    ids=["int8-int64", "bool-float64", "uint8-float32", "float16-int64", "int16-int32"],
)
def test_tensor_after_an_odd_sized_tensor_is_decoded_correctly_and_aligned(
    odd: torch.Tensor, aligned: torch.Tensor
) -> None:
    tensors = {"odd": odd, "aligned": aligned, "tail": torch.tensor([9, 8], dtype=torch.int64)}
    decoded = round_trip(tensors).tensors
    for name, tensor in tensors.items():
        assert_identical(decoded[name], tensor)
        assert decoded[name].data_ptr() % decoded[name].element_size() == 0
    decoded["aligned"] += 1
    assert torch.equal(decoded["aligned"], aligned + 1)


def test_wire_dtypes_name_each_dtype_by_its_torch_name() -> None:
    for name, dtype in WIRE_DTYPES.items():
        assert str(dtype) == f"torch.{name}"
    assert {torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool} <= set(DTYPES)


@pytest.mark.parametrize(
    "dtype",
    [torch.complex64, torch.complex128, torch.uint16],
    ids=["complex64", "complex128", "uint16"],
)
def test_encoding_an_unsupported_dtype_names_the_accepted_dtypes(dtype: torch.dtype) -> None:
    frame = Frame(FrameKind.FORWARD, 1, tensors={"x": torch.zeros(2, dtype=dtype)})
    with pytest.raises(WireFormatError) as caught:
        encode_frame(frame)
    message = str(caught.value)
    assert str(dtype) in message
    for name in WIRE_DTYPES:
        assert name in message


def test_wire_format_error_is_a_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x01\x00\x00"], ids=["0", "1", "3"])
def test_decoding_a_frame_shorter_than_its_length_prefix_is_refused(data: bytes) -> None:
    with pytest.raises(WireFormatError, match=rf"frame of {len(data)} bytes is too short"):
        decode_frame(data)


def test_decoding_every_truncation_of_a_valid_frame_is_refused() -> None:
    data = encode_frame(
        Frame(
            FrameKind.FORWARD,
            3,
            tensors={"a": torch.randn(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)},
            scalars={"loss": 0.5},
        )
    )
    for length in range(len(data)):
        with pytest.raises(WireFormatError):
            decode_frame(data[:length])


def test_decoding_a_header_length_beyond_the_frame_is_refused() -> None:
    header = json.dumps(forward_header()).encode()
    data = struct.pack("<I", len(header) + 10) + header
    with pytest.raises(
        WireFormatError, match=rf"claims {len(header) + 10} bytes.*{len(data)} in all"
    ):
        decode_frame(data)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b'{"kind": "forward"',
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"null",
        b'{"step": 1}',
        b'{"kind": "forward"}',
        b'{"kind": "forward", "step": "one"}',
    ],
    ids=["garbage", "unterminated", "not-utf8", "list", "null", "no-kind", "no-step", "bad-step"],
)
def test_decoding_an_invalid_json_header_is_refused(header: bytes) -> None:
    data = struct.pack("<I", len(header)) + header
    with pytest.raises(WireFormatError, match="frame header is not valid"):
        decode_frame(data)


def test_decoding_an_unknown_dtype_is_refused_and_lists_the_carried_dtypes() -> None:
    data = raw_frame(forward_header(["x", "complex64", [2], 16]), b"\x00" * 16)
    with pytest.raises(WireFormatError) as caught:
        decode_frame(data)
    message = str(caught.value)
    assert "'x'" in message and "'complex64'" in message
    for name in WIRE_DTYPES:
        assert name in message


@pytest.mark.parametrize(("shape", "nbytes"), [([3], 8), ([3], 16), ([2, 2], 12), ([], 0)])
def test_decoding_a_byte_length_not_matching_shape_and_itemsize_is_refused(
    shape: list[int], nbytes: int
) -> None:
    data = raw_frame(forward_header(["x", "float32", shape, nbytes]), b"\x00" * nbytes)
    expected = 4 * math.prod(shape)
    with pytest.raises(
        WireFormatError, match=rf"'x'.*needs {expected} bytes, header says {nbytes}"
    ):
        decode_frame(data)


def test_decoding_a_tensor_running_past_the_end_of_the_frame_is_refused() -> None:
    data = raw_frame(
        forward_header(["a", "float32", [2], 8], ["b", "int64", [2], 16]), b"\x00" * 20
    )
    with pytest.raises(
        WireFormatError, match=r"'b' runs past the end of the frame \(24 > 20 bytes\)"
    ):
        decode_frame(data)


@pytest.mark.parametrize("extra", [1, 3, 64])
def test_decoding_trailing_bytes_no_tensor_accounts_for_is_refused(extra: int) -> None:
    data = encode_frame(Frame(FrameKind.FORWARD, 1, tensors={"x": torch.ones(2)})) + b"\x00" * extra
    with pytest.raises(WireFormatError, match=rf"{extra} bytes that no tensor entry accounts for"):
        decode_frame(data)


def test_decoding_trailing_bytes_after_a_frame_without_tensors_is_refused() -> None:
    data = raw_frame(forward_header(), b"junk")
    with pytest.raises(WireFormatError, match="4 bytes"):
        decode_frame(data)


@pytest.mark.parametrize("shape", [[-1], [-2, -2], [3, -1, 0]], ids=str)
def test_decoding_a_negative_dimension_is_refused(shape: list[int]) -> None:
    nbytes = 16 if shape == [-2, -2] else 0
    data = raw_frame(forward_header(["x", "float32", shape, nbytes]), b"\x00" * nbytes)
    with pytest.raises(WireFormatError, match=r"'x' has a negative dimension"):
        decode_frame(data)


@pytest.mark.parametrize(
    "entry",
    [
        ["x", "float32", [1]],
        ["x", "float32", "ab", 4],
        ["x", "float32", [None], 4],
        ["x", "float32", [1], "four"],
        "xyz",
    ],
    ids=["three-fields", "shape-string", "shape-null", "nbytes-string", "entry-string"],
)
def test_decoding_a_malformed_tensor_entry_is_refused(entry: object) -> None:
    data = raw_frame(forward_header(entry), b"\x00" * 4)
    with pytest.raises(WireFormatError, match="not valid"):
        decode_frame(data)


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ({"kind": "forward", "step": 1, "tensors": 5}, b""),
        ({"kind": "forward", "step": 1, "tensors": [["x", ["float32"], [1], 4]]}, b"\x00" * 4),
        ({"kind": "forward", "step": 1, "tensors": [[["x"], "float32", [1], 4]]}, b"\x00" * 4),
    ],
    ids=["tensors-not-a-list", "dtype-not-a-string", "name-not-a-string"],
)
def test_decoding_wrongly_typed_header_fields_raises_wire_format_error(
    header: dict, body: bytes
) -> None:
    with pytest.raises(WireFormatError):
        decode_frame(raw_frame(header, body))


def test_frame_defaults_to_no_tensors_and_no_scalars() -> None:
    first, second = Frame(FrameKind.ERROR, 1), Frame(FrameKind.ERROR, 1)
    assert first.tensors == {} and first.scalars == {}
    first.scalars["error"] = "x"
    assert second.scalars == {}
