"""Opt-in compression on the data plane: each codec round-trips within its error bound, sends
the bytes it says, refuses what it cannot carry, and the split server replies in kind."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from splitfed import GrpcDataPlane, SplitServerError
from splitfed.wire import (
    COMPRESSIONS,
    Frame,
    FrameKind,
    WireFormatError,
    decode_frame,
    encode_frame,
)

from .conftest import SGD_MOMENTUM, digits_batches, small_split, train_round_concurrently

CODECS = [c for c in COMPRESSIONS if c != "none"]


def batch_frame(values: torch.Tensor) -> Frame:
    labels = torch.arange(len(values)) % 10
    return Frame(FrameKind.FORWARD, 3, tensors={"activations": values, "labels": labels})


def activations(rows: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, as gradients of different examples are."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, 2, rows).reshape(rows, 1, 1, 1)
    return torch.randn(rows, 8, 4, 4, generator=generator) * scales


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_keeps_dtype_shape_labels_and_names_its_codec(codec: str) -> None:
    frame = batch_frame(activations())
    decoded = decode_frame(encode_frame(frame, compression=codec))
    assert decoded.tensors["activations"].dtype == torch.float32
    assert decoded.tensors["activations"].shape == frame.tensors["activations"].shape
    assert torch.equal(
        decoded.tensors["labels"], frame.tensors["labels"]
    )  # ints travel as they are
    assert decoded.codecs == {"activations": codec}
    assert (decoded.kind, decoded.step) == (frame.kind, frame.step)


@pytest.mark.parametrize(
    ("codec", "relative_error"),
    [("fp16", 2.0**-11), ("bf16", 2.0**-8)],
)
def test_16_bit_codecs_round_to_half_a_unit_in_the_last_place(codec, relative_error) -> None:
    values = activations()
    decoded = decode_frame(encode_frame(batch_frame(values), compression=codec))
    error = (decoded.tensors["activations"] - values).abs()
    assert bool((error <= values.abs() * relative_error + 1e-7).all())


def test_int8_per_row_error_is_at_most_half_a_step_of_each_row() -> None:
    values = activations()
    decoded = decode_frame(encode_frame(batch_frame(values), compression="int8-row"))
    step = values.reshape(len(values), -1).abs().amax(dim=1) / 127
    error = (decoded.tensors["activations"] - values).reshape(len(values), -1).abs()
    assert bool((error <= step[:, None] * 0.5 * (1 + 1e-5)).all())


def test_int8_per_tensor_error_is_at_most_half_a_step_of_the_tensor() -> None:
    values = activations()
    decoded = decode_frame(encode_frame(batch_frame(values), compression="int8-tensor"))
    step = values.abs().max() / 127
    assert float((decoded.tensors["activations"] - values).abs().max()) <= step * 0.5 * (1 + 1e-5)


def test_int8_per_row_keeps_small_rows_that_per_tensor_rounds_away() -> None:
    values = activations()
    small = values[0]
    by_row = decode_frame(encode_frame(batch_frame(values), compression="int8-row"))
    by_tensor = decode_frame(encode_frame(batch_frame(values), compression="int8-tensor"))
    assert torch.count_nonzero(by_tensor.tensors["activations"][0]) == 0
    assert torch.allclose(
        by_row.tensors["activations"][0], small, rtol=0, atol=small.abs().max() / 200
    )


@pytest.mark.parametrize(
    ("codec", "bytes_per_value", "scales"),
    [("fp16", 2, 0), ("bf16", 2, 0), ("int8-row", 1, 16), ("int8-tensor", 1, 1)],
)
def test_codec_sends_exactly_its_bytes(codec, bytes_per_value, scales) -> None:
    frame = batch_frame(activations())
    packed = encode_frame(frame, compression=codec)
    numel = frame.tensors["activations"].numel()
    header_length = struct.unpack_from("<I", packed)[0]
    entry = json.loads(packed[4 : 4 + header_length])["tensors"][0]
    assert entry[3:] == [numel * bytes_per_value + 4 * scales, codec]
    labels_bytes = frame.tensors["labels"].numel() * 8
    assert len(packed) == 4 + header_length + entry[3] + labels_bytes


def test_no_compression_is_the_same_bytes_and_exact() -> None:
    frame = batch_frame(activations())
    assert encode_frame(frame, compression="none") == encode_frame(frame)
    decoded = decode_frame(encode_frame(frame))
    assert torch.equal(decoded.tensors["activations"], frame.tensors["activations"])
    assert decoded.codecs == {}


def test_float64_tensors_come_back_float64() -> None:
    values = activations().double()
    decoded = decode_frame(encode_frame(batch_frame(values), compression="int8-row"))
    assert decoded.tensors["activations"].dtype == torch.float64


def test_all_zero_rows_decode_to_zero() -> None:
    decoded = decode_frame(encode_frame(batch_frame(torch.zeros(4, 3)), compression="int8-row"))
    assert torch.equal(decoded.tensors["activations"], torch.zeros(4, 3))


def test_unknown_compression_is_refused_with_the_choices() -> None:
    with pytest.raises(WireFormatError, match="unknown data-plane compression 'zip'.*'int8-row'"):
        encode_frame(batch_frame(activations()), compression="zip")


@pytest.mark.parametrize("codec", ["int8-row", "int8-tensor"])
def test_int8_refuses_non_finite_values_and_says_why(codec: str) -> None:
    values = activations()
    values[2, 0, 0, 0] = float("nan")
    with pytest.raises(WireFormatError, match="NaN or infinity.*diverged"):
        encode_frame(batch_frame(values), compression=codec)


def test_fp16_refuses_values_beyond_its_range_and_suggests_bf16() -> None:
    with pytest.raises(WireFormatError, match="float16's range.*'bf16'"):
        encode_frame(batch_frame(torch.full((2, 3), 1e6)), compression="fp16")
    decoded = decode_frame(encode_frame(batch_frame(torch.full((2, 3), 1e6)), compression="bf16"))
    assert torch.allclose(decoded.tensors["activations"], torch.full((2, 3), 1e6), rtol=2**-8)


def rewrite_entry(data: bytes, change) -> bytes:
    length = struct.unpack_from("<I", data)[0]
    header = json.loads(data[4 : 4 + length])
    change(header["tensors"][0])
    encoded = json.dumps(header).encode()
    return struct.pack("<I", len(encoded)) + encoded + data[4 + length :]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda e: e.__setitem__(4, "zip"), "compression 'zip'"),
        (lambda e: e.__setitem__(1, "int64"), "only float32 and float64"),
        (lambda e: e.__setitem__(3, e[3] - 1), "needs .* bytes"),
        (lambda e: e.append("extra"), "at most five fields"),
        (lambda e: e.__setitem__(2, [16, 8, 4, -4]), "negative dimension"),
    ],
)
def test_bad_compressed_entries_are_refused(change, complaint) -> None:
    data = encode_frame(batch_frame(activations()), compression="int8-row")
    with pytest.raises(WireFormatError, match=complaint):
        decode_frame(rewrite_entry(data, change))


def test_non_finite_int8_scales_are_refused() -> None:
    data = bytearray(encode_frame(batch_frame(activations()), compression="int8-row"))
    start = 4 + struct.unpack_from("<I", data)[0]
    struct.pack_into("<f", data, start, float("inf"))
    with pytest.raises(WireFormatError, match="scales that are not finite"):
        decode_frame(bytes(data))


def test_truncated_compressed_frame_is_refused() -> None:
    data = encode_frame(batch_frame(activations()), compression="fp16")
    with pytest.raises(WireFormatError, match="runs past the end"):
        decode_frame(data[:-2])


def test_data_plane_refuses_an_unknown_compression_before_connecting() -> None:
    with pytest.raises(ValueError, match="unknown data-plane compression"):
        GrpcDataPlane(address="127.0.0.1:1", node_id=1, server_round=1, token="", compression="x")


@pytest.mark.parametrize("codec", CODECS)
def test_split_server_replies_in_kind_and_counts_wire_bytes(codec, split_server_factory) -> None:
    split = small_split()
    server = split_server_factory(split, variant="v1")
    tokens = server.open_round(1, [7])
    batches = digits_batches(0, 64, 16)
    client_half = split.client_half
    with GrpcDataPlane(
        address=server.address, node_id=7, server_round=1, token=tokens[7], compression=codec
    ) as plane:
        for step, (inputs, labels) in enumerate(batches, start=1):
            reply = plane.exchange(step, client_half(inputs).detach(), labels)
            assert reply.cut_gradient.dtype == torch.float32
    stats = server.close_round()
    assert stats.batches == len(batches)
    assert (stats.bytes_received, stats.bytes_sent) == (plane.bytes_sent, plane.bytes_received)
    uncompressed = sum(
        len(
            encode_frame(
                Frame(FrameKind.FORWARD, 1, tensors={"activations": client_half(x), "labels": y})
            )
        )
        for x, y in batches
    )
    assert stats.bytes_received < uncompressed * 0.6


def test_compressed_training_stays_close_to_exact_training(split_server_factory) -> None:
    batches = digits_batches(0, 96, 16)
    halves = {}
    for codec in ("none", "bf16"):
        split = small_split()
        server = split_server_factory(split, variant="v1")
        halves[codec], _ = train_round_concurrently(server, split, {1: batches}, compression=codec)
    exact, packed = halves["none"][1].state_dict(), halves["bf16"][1].state_dict()
    initial = small_split().client_half.state_dict()
    keys = [key for key in exact if exact[key].is_floating_point()]

    def norm(tensors) -> float:
        return float(torch.cat([t.flatten() for t in tensors]).norm())

    update = norm(exact[k] - initial[k] for k in keys)
    difference = norm(exact[k] - packed[k] for k in keys)
    # bf16 keeps 8 bits of mantissa: the weights drift by a small part of what training moved.
    assert 0 < difference < 0.05 * update, (difference, update)


def test_a_gradient_the_codec_cannot_carry_is_refused_on_its_stream(split_server_factory) -> None:
    split = small_split()
    server = split_server_factory(split, variant="v1")
    # Gradients of about 1e6: within max_abs_gradient, beyond float16 (65504).
    server.trainer.loss_fn = lambda outputs, labels: outputs.sum() * 1e6
    tokens = server.open_round(1, [3])
    inputs, labels = digits_batches(0, 16, 16)[0]
    with (
        GrpcDataPlane(
            address=server.address, node_id=3, server_round=1, token=tokens[3], compression="fp16"
        ) as plane,
        pytest.raises(SplitServerError, match="float16's range"),
    ):
        plane.exchange(1, split.client_half(inputs).detach(), labels)
    assert server.close_round().refused_batches == 1


def test_the_strategy_refuses_an_unknown_compression_and_lists_the_choices() -> None:
    from splitfed import SplitFed  # noqa: PLC0415

    with pytest.raises(ValueError, match="data_plane_compression='gzip' is not known.*'bf16'"):
        SplitFed(split=small_split(), insecure=True, data_plane_compression="gzip")


def test_split_server_refuses_fewer_than_one_intra_op_thread() -> None:
    from splitfed import SplitServer, make_trainer  # noqa: PLC0415

    split = small_split()
    trainer = make_trainer("v1", server_half=split.server_half, optimizer=SGD_MOMENTUM)
    with pytest.raises(ValueError, match="intra_op_threads must be at least 1, or None"):
        SplitServer(trainer=trainer, activation_shape=(4, 4, 4), insecure=True, intra_op_threads=0)
