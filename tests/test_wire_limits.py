"""A frame is checked from its header before it costs anything.

With :class:`FrameLimits` the decoder refuses a frame of the wrong kind, size, dtype, shape,
compression or batch from its header alone, having read none of its tensor bytes and allocated
next to nothing; an accepted frame costs little more than its tensors. Without limits, the
module's own bounds still hold: whatever the header says, decoding raises
:class:`WireFormatError` with a short message, or decodes.
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from splitfed import wire
from splitfed.wire import (
    COMPRESSIONS,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_HEADER_DEPTH,
    MAX_NAME_CHARS,
    MAX_SCALARS,
    MAX_TENSORS,
    Frame,
    FrameKind,
    FrameLimits,
    TensorSpec,
    WireFormatError,
    decode_frame,
    encode_frame,
    max_frame_bytes,
)

SHAPE = (4, 2, 2)
MAX_BATCH = 8


def server_limits(**overrides: object) -> FrameLimits:
    """What a plain split server takes: float32 activations of ``SHAPE`` and int64 labels."""
    activations = TensorSpec(frozenset({torch.float32}), SHAPE)
    labels = TensorSpec(frozenset({torch.int64}), ())
    arguments: dict = {
        "kinds": {FrameKind.FORWARD: {"activations": activations, "labels": labels}},
        "max_batch": MAX_BATCH,
    }
    arguments.update(overrides)
    return FrameLimits(**arguments)


def batch_frame(
    examples: int = MAX_BATCH,
    *,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] = SHAPE,
    labels: int | None = None,
    kind: str = FrameKind.FORWARD,
) -> Frame:
    generator = torch.Generator().manual_seed(examples)
    activations = torch.randn(examples, *shape, generator=generator).to(dtype)
    tensors = {
        "activations": activations,
        "labels": torch.arange(examples if labels is None else labels),
    }
    return Frame(kind, 1, tensors=tensors)


def raw_frame(header: object, body: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    data = text.encode("utf-8", "surrogatepass")
    return struct.pack("<I", len(data)) + data + body


def refuse(data: bytes, limits: FrameLimits | None = None) -> str:
    """The message ``data`` is refused with; it is short and carries no backtrace."""
    with pytest.raises(WireFormatError) as caught:
        decode_frame(data, limits=limits)
    message = str(caught.value)
    assert len(message) <= 300, message
    assert "Exception raised from" not in message and "Traceback" not in message
    assert caught.value.__cause__ is None  # refused by a check, not converted from an error
    return message


def with_bad_int8_scales(data: bytes) -> bytes:
    """``data`` (int8-compressed activations first) with a NaN as its first scale: a frame that
    fails if its tensor bytes are read."""
    damaged = bytearray(data)
    struct.pack_into("<f", damaged, 4 + struct.unpack_from("<I", data)[0], float("nan"))
    return bytes(damaged)


# -- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", COMPRESSIONS)
def test_a_frame_within_the_limits_decodes_as_it_does_without_them(codec: str) -> None:
    data = encode_frame(batch_frame(), compression=codec)
    within, without = decode_frame(data, limits=server_limits()), decode_frame(data)
    assert (within.kind, within.step, within.codecs) == (without.kind, without.step, without.codecs)
    for name, tensor in without.tensors.items():
        assert torch.equal(within.tensors[name], tensor)
        assert within.tensors[name].dtype == tensor.dtype


def test_a_batch_of_up_to_max_batch_examples_is_accepted() -> None:
    for examples in (0, 1, MAX_BATCH):
        frame = decode_frame(encode_frame(batch_frame(examples)), limits=server_limits())
        assert frame.tensors["activations"].shape == (examples, *SHAPE)


REFUSALS = {
    "kind": (
        lambda: batch_frame(kind=FrameKind.SMASHED),
        r"frame kind 'smashed' is not accepted here; expected 'forward'",
    ),
    "float64": (
        lambda: batch_frame(dtype=torch.float64),
        r"tensor 'activations' of a 'forward' frame is float64; it must be float32",
    ),
    "per-example shape": (
        lambda: batch_frame(shape=(4, 2, 3)),
        r"'activations' of a 'forward' frame has shape \[8, 4, 2, 3\]; it must be "
        r"\(batch, 4, 2, 2\)",
    ),
    "flat activations": (
        lambda: batch_frame(shape=(16,)),
        r"has shape \[8, 16\]; it must be \(batch, 4, 2, 2\)",
    ),
    "batch too large": (
        lambda: batch_frame(MAX_BATCH + 1),
        r"'activations' of a 'forward' frame holds a batch of 9 examples; at most 8 are accepted",
    ),
    "labels for another batch": (
        lambda: batch_frame(labels=MAX_BATCH - 1),
        r"tensor 'labels' holds a batch of 7 examples, tensor 'activations' one of 8",
    ),
    "no labels": (
        lambda: Frame(FrameKind.FORWARD, 1, tensors={"activations": torch.zeros(2, *SHAPE)}),
        r"a 'forward' frame carries 'labels'; this one does not",
    ),
    "a tensor not listed": (
        lambda: Frame(
            FrameKind.FORWARD, 1, tensors={**batch_frame(2).tensors, "mask": torch.ones(2)}
        ),
        r"a 'forward' frame carries no tensor 'mask'; it carries 'activations', 'labels'",
    ),
    "labels of another shape": (
        lambda: Frame(
            FrameKind.FORWARD,
            1,
            tensors={"activations": torch.zeros(2, *SHAPE), "labels": torch.zeros(2, 1).long()},
        ),
        r"'labels' of a 'forward' frame has shape \[2, 1\]; it must be \(batch\)",
    ),
    "too many scalars": (
        lambda: Frame(
            FrameKind.FORWARD,
            1,
            tensors=batch_frame(2).tensors,
            scalars={f"s{i}": i for i in range(17)},
        ),
        r"frame carries 17 scalars; at most 16 are accepted",
    ),
}


@pytest.mark.parametrize("codec", ["none", "int8-row"])
@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_a_frame_outside_the_limits_is_refused_from_its_header(case: str, codec: str) -> None:
    make, expected = REFUSALS[case]
    data = encode_frame(make(), compression=codec)
    if codec != "none":  # a frame that fails once its tensor bytes are read
        data = with_bad_int8_scales(data)
        with pytest.raises(WireFormatError, match="int8 scales that are not finite"):
            decode_frame(data)
    message = refuse(data, server_limits())
    assert re.search(expected, message), message


def test_a_compression_the_limits_do_not_list_is_refused() -> None:
    limits = server_limits(
        kinds={
            FrameKind.FORWARD: {
                "activations": TensorSpec(
                    frozenset({torch.float32}), SHAPE, compressions=frozenset({"none", "bf16"})
                ),
                "labels": TensorSpec(frozenset({torch.int64}), ()),
            }
        }
    )
    decode_frame(encode_frame(batch_frame(), compression="bf16"), limits=limits)
    data = with_bad_int8_scales(encode_frame(batch_frame(), compression="int8-tensor"))
    message = refuse(data, limits)
    assert message == (
        "tensor 'activations' of a 'forward' frame travelled with compression 'int8-tensor'; "
        "it may travel with 'bf16', 'none'"
    )


def test_an_optional_tensor_may_be_left_out_and_a_fixed_one_keeps_its_shape() -> None:
    limits = FrameLimits(
        kinds={
            FrameKind.OUTPUT_GRADIENT: {
                "gradient": TensorSpec(frozenset({torch.float32, torch.float64}), (3,)),
                "mask": TensorSpec(frozenset({torch.bool}), (2, 2), batch=False, required=False),
            }
        },
        max_batch=4,
    )
    bare = Frame(FrameKind.OUTPUT_GRADIENT, 2, tensors={"gradient": torch.ones(4, 3).double()})
    assert decode_frame(encode_frame(bare), limits=limits).tensors["gradient"].dtype == (
        torch.float64
    )
    masked = Frame(
        FrameKind.OUTPUT_GRADIENT,
        2,
        tensors={"gradient": torch.ones(4, 3), "mask": torch.ones(3, 2, dtype=torch.bool)},
    )
    message = refuse(encode_frame(masked), limits)
    assert message == (
        "tensor 'mask' of a 'output-gradient' frame has shape [3, 2]; it must be (2, 2)"
    )


def test_max_frame_bytes_is_the_largest_frame_the_limits_admit() -> None:
    limits = server_limits(max_header_bytes=1024)
    largest = 0
    for codec in COMPRESSIONS:
        data = encode_frame(batch_frame(MAX_BATCH), compression=codec)
        header_length = struct.unpack_from("<I", data)[0]
        largest = max(largest, len(data) - header_length)
        decode_frame(data, limits=limits)
    assert max_frame_bytes(limits) == largest + 1024
    assert max_frame_bytes(limits) == 4 + 1024 + MAX_BATCH * (4 * math.prod(SHAPE) + 8)


def test_a_frame_larger_than_the_limits_admit_is_refused_before_its_header_is_read() -> None:
    limits = server_limits()
    size = max_frame_bytes(limits) + 1
    data = struct.pack("<I", 2) + b"{}" + b"\x00" * (size - 6)
    assert refuse(data, limits) == (
        f"frame of {size} bytes is larger than the {size - 1} bytes a frame may have here"
    )


def test_a_header_longer_than_the_limits_allow_is_refused_unread() -> None:
    limits = server_limits(max_header_bytes=100)
    header = {"kind": "forward", "step": 1, "scalars": {"pad": "x" * 100}, "tensors": []}
    length = len(json.dumps(header))
    message = refuse(raw_frame(header), limits)
    assert message.startswith(f"frame header of {length} bytes is longer than the 100 bytes")
    # Without limits, a header is bounded too, from its length prefix alone.
    message = refuse(struct.pack("<I", MAX_HEADER_BYTES + 1))
    assert message == (
        f"frame header of {MAX_HEADER_BYTES + 1} bytes is longer than the {MAX_HEADER_BYTES} "
        "bytes a header may have"
    )


@pytest.mark.parametrize(
    ("scalar", "text"),
    [
        ("NaN", "'NaN' is not accepted here"),
        ("-Infinity", "'-Infinity' is not accepted here"),
        ("1e999", "the number '1e999' is beyond a float's range"),
    ],
)
def test_non_finite_numbers_are_refused_under_limits(scalar: str, text: str) -> None:
    data = encode_frame(batch_frame(1))
    length = struct.unpack_from("<I", data)[0]
    header = data[4 : 4 + length].decode()
    header = header.replace('"scalars":{}', f'"scalars":{{"loss":{scalar}}}')
    message = refuse(raw_frame(header, data[4 + length :]), server_limits())
    assert message == f"frame header is not valid: {text}"


def test_a_non_finite_scalar_decodes_without_limits() -> None:
    # The label-private split's BACKWARD frame carries loss NaN: the loss stays on the client.
    reply = Frame(
        FrameKind.BACKWARD, 3, tensors={"gradient": torch.ones(2)}, scalars={"loss": math.nan}
    )
    decoded = decode_frame(encode_frame(reply))
    assert math.isnan(decoded.scalars["loss"])  # type: ignore[arg-type]


def test_limits_are_checked_when_built_and_cannot_change() -> None:
    with pytest.raises(ValueError, match="one or more of the dtypes frames carry"):
        TensorSpec(frozenset({torch.complex64}), ())
    with pytest.raises(ValueError, match="tuple of at most 31 integers in"):
        TensorSpec(frozenset({torch.float32}), (-1,))
    with pytest.raises(ValueError, match="compressions are one or more of"):
        TensorSpec(frozenset({torch.float32}), (), compressions=frozenset({"zip"}))
    with pytest.raises(ValueError, match="no tensor meets this TensorSpec"):
        TensorSpec(frozenset({torch.int64}), (), compressions=frozenset({"fp16"}))
    with pytest.raises(ValueError, match="max_batch must be an integer >= 0"):
        server_limits(max_batch=-1)
    with pytest.raises(ValueError, match="max_header_bytes must be an integer in"):
        server_limits(max_header_bytes=MAX_HEADER_BYTES + 1)
    with pytest.raises(ValueError, match="max_scalars must be an integer in"):
        server_limits(max_scalars=MAX_SCALARS + 1)
    with pytest.raises(TypeError, match="needs a TensorSpec, got tuple"):
        server_limits(kinds={FrameKind.FORWARD: {"activations": (torch.float32, SHAPE)}})
    specs = {"x": TensorSpec({torch.float32}, [3])}  # type: ignore[arg-type]
    limits = server_limits(kinds={FrameKind.FORWARD: specs})
    specs["y"] = specs["x"]
    assert list(limits.kinds[FrameKind.FORWARD]) == ["x"]
    assert limits.kinds[FrameKind.FORWARD]["x"].shape == (3,)
    with pytest.raises(TypeError):
        limits.kinds[FrameKind.FORWARD]["y"] = specs["x"]  # type: ignore[index]


# -- bounds without limits -----------------------------------------------------------------------


def entry_header(*entries: object, **fields: object) -> dict:
    return {"kind": "forward", "step": 1, "scalars": {}, "tensors": list(entries), **fields}


HARD_LIMITS = {
    "dimension 1e999": (
        '{"kind":"forward","step":1,"tensors":[["x","float32",[1e999],4]]}',
        "the shape must be a list of at most 32 integers",
    ),
    "dimension 2.0": (entry_header(["x", "float32", [2.0], 8]), "the shape must be a list"),
    "dimension true": (entry_header(["x", "float32", [True], 4]), "the shape must be a list"),
    "dimension '3'": (entry_header(["x", "float32", ["3"], 12]), "the shape must be a list"),
    "dimension 2**63": (
        entry_header(["x", "float32", [0, 2**63], 0]),
        "'x' has a dimension beyond 2**31 - 1 in shape [0, 9223372036854775808]",
    ),
    "dimension 2**31": (
        entry_header(["x", "uint8", [2**31], 2**31]),
        "'x' has a dimension beyond 2**31 - 1",
    ),
    "empty but vast": (
        entry_header(["x", "float32", [0, 2**31 - 1, 2**31 - 1], 0]),
        "'x' has shape [0, 2147483647, 2147483647], beyond 2**40 elements",
    ),
    "too many dimensions": (
        entry_header(["x", "float32", [1] * (MAX_DIMS + 1), 4]),
        f"at most {MAX_DIMS} integers",
    ),
    "integer of 5000 digits": (
        '{"kind":"forward","step":' + "9" * 5000 + "}",
        "an integer of 5000 characters is beyond 64 bits",
    ),
    "step 2**63": (entry_header(step=2**63), "the step must be a 64-bit integer"),
    "step NaN": ('{"kind":"forward","step":NaN}', "the step must be a 64-bit integer, got nan"),
    "byte length Infinity": (
        '{"kind":"forward","step":1,"tensors":[["x","float32",[1],Infinity]]}',
        "the byte length must be an integer",
    ),
    "1000 nested lists": (
        '{"kind":"forward","step":1,"scalars":' + "[" * 1000 + "]" * 1000 + "}",
        f"it nests deeper than {MAX_HEADER_DEPTH} levels",
    ),
    "nested objects": (
        '{"kind":"forward","step":1,"x":' + '{"a":' * 20 + "1" + "}" * 20 + "}",
        f"it nests deeper than {MAX_HEADER_DEPTH} levels",
    ),
    "a key twice": ('{"kind":"forward","step":1,"kind":"backward"}', "key 'kind' appears twice"),
    "a tensor twice": (
        entry_header(["x", "uint8", [1], 1], ["x", "uint8", [1], 1]),
        "tensor 'x' appears twice in the frame",
    ),
    "a list as scalar": (
        entry_header(scalars={"loss": [1, 2]}),
        "scalar 'loss' is [1, 2]; a scalar is a string, a number or a boolean",
    ),
    "a null scalar": (entry_header(scalars={"loss": None}), "scalar 'loss' is None"),
    "too many scalars": (
        entry_header(scalars={f"s{i}": 0 for i in range(MAX_SCALARS + 1)}),
        f"frame carries {MAX_SCALARS + 1} scalars; at most {MAX_SCALARS} are accepted",
    ),
    "too many tensors": (
        entry_header(*[[f"t{i}", "uint8", [0], 0] for i in range(MAX_TENSORS + 1)]),
        f"frame lists {MAX_TENSORS + 1} tensors; at most {MAX_TENSORS} are accepted",
    ),
    "a long kind": (
        entry_header(kind="k" * (MAX_NAME_CHARS + 1)),
        f"the kind must be a string of at most {MAX_NAME_CHARS} characters",
    ),
    "a long name": (
        entry_header(["n" * (MAX_NAME_CHARS + 1), "uint8", [0], 0]),
        f"the name must be a string of at most {MAX_NAME_CHARS} characters",
    ),
    "'none' written out": (
        entry_header(["x", "float32", [1], 4, "none"]),
        "'x' travelled with compression 'none'; this version decodes 'fp16'",
    ),
    "compressed and empty": (
        entry_header(["x", "float32", [0, 3], 0, "fp16"]),
        "compressed as fp16 needs 0 bytes (and at least one value), header says 0",
    ),
    "a byte order mark": ('\ufeff{"kind":"forward","step":1}', "Unexpected UTF-8 BOM"),
    "a lone surrogate": (
        '{"kind":"\\ud800","step":1,"tensors":[["\\udfff","int7",[1],1]]}',
        "tensor '\\udfff' has dtype 'int7'",
    ),
}


@pytest.mark.parametrize("case", list(HARD_LIMITS), ids=list(HARD_LIMITS))
def test_the_module_bounds_hold_without_limits(case: str) -> None:
    header, expected = HARD_LIMITS[case]
    body = b"\x00" * 16
    message = refuse(raw_frame(header, body))
    assert expected in message, message


def test_a_header_of_up_to_the_depth_bound_parses() -> None:
    nested = "[" * (MAX_HEADER_DEPTH - 1) + "]" * (MAX_HEADER_DEPTH - 1)
    frame = decode_frame(raw_frame('{"kind":"forward","step":1,"extra":' + nested + "}"))
    assert frame.kind == FrameKind.FORWARD
    brackets_in_strings = json.dumps({"kind": "[" * 100 + "{" * 100, "step": 1})
    assert decode_frame(raw_frame(brackets_in_strings)).kind == "[" * 100 + "{" * 100


def test_echoed_input_is_cut_short() -> None:
    message = refuse(raw_frame(entry_header(["x" * 200, "int7", [1] * 30, 10**15])))
    assert "xxx...xxx" in message and len(message) < 300
    message = refuse(raw_frame(entry_header(scalars={"s": "y" * 10_000 + "z"}, tensors=5)))
    assert len(message) < 300


def test_an_error_no_check_foresaw_is_still_a_short_refusal(monkeypatch) -> None:
    def fails(*_: object) -> None:
        raise RuntimeError(
            "numel overflow at 0x7f3a2c001234\nException raised from compute at /x/lib.so\n"
            "frame #0: c10::Error::Error() + 0x8c (0x7f3a2c001234 in /x/libc10.so)"
        )

    monkeypatch.setattr(wire, "_read_tensors", fails)
    with pytest.raises(WireFormatError) as caught:
        decode_frame(encode_frame(Frame(FrameKind.FORWARD, 1)))
    assert str(caught.value) == (
        "frame could not be decoded: RuntimeError: numel overflow at <address>"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("codec", COMPRESSIONS[1:])
@pytest.mark.parametrize(
    "shape",
    [(3, 2**20 + 3), (2**20 // 5 + 7, 5), (2**20 + 1,), (1,)],
    ids=["rows-longer-than-a-chunk", "many-short-rows", "one-long-vector", "one-value"],
)
def test_compressed_tensors_decode_exactly_as_their_codec_defines_in_chunks(
    shape: tuple[int, ...], codec: str, dtype: torch.dtype
) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    data = encode_frame(Frame(FrameKind.FORWARD, 1, tensors={"x": tensor}), compression=codec)
    body = data[4 + struct.unpack_from("<I", data)[0] :]
    if codec in ("fp16", "bf16"):
        half = torch.float16 if codec == "fp16" else torch.bfloat16
        expected = torch.frombuffer(bytearray(body), dtype=half).to(dtype).reshape(shape)
    else:
        rows = shape[0] if codec == "int8-row" else 1
        scales = torch.frombuffer(bytearray(body[: 4 * rows]), dtype=torch.float32)
        values = torch.frombuffer(bytearray(body[4 * rows :]), dtype=torch.int8)
        expected = (values.reshape(rows, -1).float() * scales[:, None]).to(dtype).reshape(shape)
    decoded = decode_frame(data).tensors["x"]
    assert decoded.dtype == dtype
    assert torch.equal(decoded, expected)


def test_decoded_tensors_own_their_storage_aligned_to_their_element() -> None:
    tensors = {
        "odd": torch.tensor([1, 2, 3], dtype=torch.int8),
        "a": torch.randn(3, 5),
        "b": torch.arange(7),
    }
    data = bytearray(encode_frame(Frame(FrameKind.FORWARD, 1, tensors=tensors)))
    decoded = decode_frame(data).tensors
    pointers = {name: t.untyped_storage().data_ptr() for name, t in decoded.items()}
    assert len(set(pointers.values())) == 3
    for tensor in decoded.values():
        assert tensor.data_ptr() % tensor.element_size() == 0
    data.extend(b"\x00")  # no view into the buffer outlives decoding


def test_a_refused_frame_leaves_its_buffer_free() -> None:
    data = bytearray(encode_frame(batch_frame(2), compression="int8-row"))
    for damaged in (with_bad_int8_scales(bytes(data)), bytes(data[:-1]), b"\x05\x00\x00\x00{oops"):
        buffer = bytearray(damaged)
        with pytest.raises(WireFormatError):
            decode_frame(buffer)
        buffer.extend(b"\x00")  # resizing fails while a memoryview of it is alive


# -- memory --------------------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import gc, json, re, struct, sys, tracemalloc
    import torch
    from splitfed.wire import (
        Frame, FrameLimits, TensorSpec, WireFormatError, decode_frame, encode_frame
    )

    MIB = 1 << 20
    BATCH, WIDTH = 128, 1 << 17  # 128 examples of 128 Ki values: 64 MiB of float32

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+)", f.read()).group(1)) * 1024

    def measure(data, limits):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from here
        before = status("VmRSS")
        tracemalloc.start()
        try:
            frame = decode_frame(data, limits=limits)
            decoded = sum(t.numel() * t.element_size() for t in frame.tensors.values())
        except WireFormatError as err:
            decoded, frame = str(err), None
        python = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peak = status("VmHWM") - before
        del frame
        return {"peak": peak, "python": python, "decoded": decoded, "frame": len(data)}

    def frame(dtype, codec, width=WIDTH):
        entry = ["activations", dtype, [BATCH, width]]
        if codec == "int8-row":
            entry += [BATCH * 4 + BATCH * width, codec]
            body = struct.pack("<f", 1.0) * BATCH + bytes(BATCH * width)
        else:
            size = {"none": 4, "bf16": 2}[codec]
            entry += [BATCH * width * size] + ([codec] if codec != "none" else [])
            body = bytes(BATCH * width * size)
        labels = ["labels", "int64", [BATCH], 8 * BATCH]
        header = json.dumps({"kind": "forward", "step": 1, "tensors": [entry, labels]}).encode()
        return b"".join([struct.pack("<I", len(header)), header, body, bytes(8 * BATCH)])

    def limits(width):
        return FrameLimits(
            kinds={"forward": {
                "activations": TensorSpec(frozenset({torch.float32}), (width,)),
                "labels": TensorSpec(frozenset({torch.int64}), ()),
            }},
            max_batch=BATCH,
        )

    results = {}
    # 128 MiB of int8 that would decode to 1 GiB of float64: refused for its dtype, and
    # for its size where the limits admit no frame that large.
    refused = frame("float64", "int8-row", width=1 << 20)
    results["refused"] = measure(refused, limits(1 << 20))
    results["too large"] = measure(refused, limits(WIDTH))
    del refused
    for codec in ("none", "bf16", "int8-row"):
        data = frame("float32", codec)
        decode_frame(data)  # the first use of a kernel and its threads, not measured
        results[codec] = measure(data, limits(WIDTH))
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size on Linux"
)
def test_a_refused_frame_costs_nothing_and_an_accepted_one_little_more_than_its_tensors() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300
    )
    if "clear_refs" in result.stderr and "Permission" in result.stderr:
        pytest.skip("this machine does not let a process reset its peak resident size")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert "is float64; it must be float32" in results["refused"]["decoded"]
    assert "bytes a frame may have here" in results["too large"]["decoded"]
    for refused in (results["refused"], results["too large"]):
        assert refused["frame"] > 128 << 20
        assert refused["peak"] < 2 << 20, results  # RSS: nothing near the frame's size
        assert refused["python"] < 256 << 10, results
    for codec in ("none", "bf16", "int8-row"):
        accepted = results[codec]
        assert accepted["decoded"] == (64 << 20) + 8 * 128
        assert accepted["peak"] < 1.1 * accepted["decoded"], (codec, results)
        assert accepted["python"] < 1 << 20, (codec, results)  # no copy of the frame
