"""A long randomized run of the frame decoder, and the checks it shares with the fuzz tests.

Inputs are valid frames, structure-aware mutations of them (header fields replaced by random JSON
values or extreme literals, entries dropped, duplicated or reshaped, deep nesting), byte-level
damage (truncations, flipped bytes, a wrong length prefix) and random bytes, each decoded with and
without :class:`~splitfed.wire.FrameLimits`. Every input must either decode (to tensors within the
limits, when given) or raise :class:`~splitfed.wire.WireFormatError` with a short message that
carries no native backtrace and no address::

    python tests/fuzz_wire.py --examples 500000 --seconds 600 --seed 1

It prints how many inputs it tried, decoded and refused, the most common reasons for refusing, and
every distinct problem it found (an exception type and the start of its message); its exit status
is 1 if it found one. With atheris installed, the same checks run coverage-guided::

    mkdir -p corpus && python tests/fuzz_wire.py --atheris -max_total_time=600 corpus
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import struct
import sys
import time
from collections import Counter
from typing import Any

import torch

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

MESSAGE_CHARS = 500
"""Longest refusal message allowed."""

EXTREME_LITERALS = [
    "1e999",
    "-1e999",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "-1",
    "0",
    "-0",
    "-0.0",
    "0.5",
    "2.0",
    "2147483647",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "1" + "0" * 30,
    "9" * 5000,
    "true",
    "false",
    "null",
    '""',
    '"3"',
    '"float32"',
    '"\\ud800"',
    '"' + "x" * 5000 + '"',
    "[]",
    "{}",
    "[[]]",
    "[1, 2, 3]",
    "[0, 9223372036854775808]",
    "[0, 2147483647, 2147483647, 2147483647]",
    "[" * 1000 + "]" * 1000,
    '{"a":' * 400 + "1" + "}" * 400,
    "[" * 20 + "]" * 20,
]
"""JSON texts (and near-JSON: NaN, Infinity) that have broken decoders: out-of-range numbers,
non-finite constants, deep nesting, wrong types."""

_BACKTRACE = re.compile(r"Exception raised from|frame #\d|\.so\b|c10::|Traceback|\bat 0x")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def problem_with(error: BaseException, data: bytes) -> str | None:
    """Why decoding ``data`` raising ``error`` is not a clean refusal; ``None`` if it is one.

    A clean refusal is a :class:`WireFormatError` raised by a check (not converted from another
    exception), with a message of at most :data:`MESSAGE_CHARS` characters that holds neither a
    native backtrace nor an address that ``data`` does not hold itself.
    """
    message = str(error)
    head = message.splitlines()[0][:80] if message else ""
    if not isinstance(error, WireFormatError):
        return f"{type(error).__name__}: {head}"
    if len(message) > MESSAGE_CHARS:
        return f"a message of {len(message)} characters: {head}"
    if _BACKTRACE.search(message):
        return f"a backtrace in the message: {head}"
    for address in _ADDRESS.findall(message):
        if address.encode() not in data:
            return f"an address in the message: {head}"
    if error.__cause__ is not None:
        cause = error.__cause__
        return f"{type(cause).__name__} caught by the last resort: {str(cause)[:60]}"
    return None


def limits_violation(frame: Frame, limits: FrameLimits) -> str | None:
    """What about a decoded ``frame`` breaks ``limits``; ``None`` if nothing does."""
    specs = limits.kinds.get(frame.kind)
    if specs is None:
        return f"kind {frame.kind!r} is not accepted"
    if len(frame.scalars) > limits.max_scalars:
        return f"{len(frame.scalars)} scalars"
    batches = set()
    for name, tensor in frame.tensors.items():
        spec = specs.get(name)
        if spec is None:
            return f"tensor {name!r} is not accepted"
        if tensor.dtype not in spec.dtypes:
            return f"tensor {name!r} is {tensor.dtype}"
        if frame.codecs.get(name, "none") not in spec.compressions:
            return f"tensor {name!r} travelled as {frame.codecs.get(name)}"
        shape = tuple(tensor.shape)
        if spec.batch:
            if not shape or shape[1:] != spec.shape or shape[0] > limits.max_batch:
                return f"tensor {name!r} has shape {shape}"
            batches.add(shape[0])
        elif shape != spec.shape:
            return f"tensor {name!r} has shape {shape}"
    if len(batches) > 1:
        return f"batches of {sorted(batches)}"
    missing = [n for n, s in specs.items() if s.required and n not in frame.tensors]
    if missing:
        return f"missing {missing}"
    return None


def refusal_reason(message: str) -> str:
    """A message with what it echoes taken out, so that refusals group by their reason."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'…'", message)
    text = re.sub(r"\[.*\]|\(.*\)|\{.*\}", "…", text)
    text = re.sub(r"-?\d[\d.e+-]*", "N", text)
    return text[:90]


# -- inputs ------------------------------------------------------------------------------------


def random_tensor(rng: random.Random, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` with random bits (NaN and infinity included)."""
    numel = math.prod(shape)
    if not numel:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(rng.randbytes(numel * dtype.itemsize))
    tensor = torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()
    if dtype == torch.bool:  # a bool is one byte, 0 or 1
        tensor = tensor.view(torch.uint8).remainder(2).to(torch.bool)
    return tensor


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, nested a few levels at most."""
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63, -(2**63) - 1, rng.randint(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e300, float("nan"), float("inf"), rng.random()])
    if choice in (4, 5):
        return rng.choice(["", "x", "float32", "int8-row", "forward", "activations", "é\u0000"])
    if choice == 6:
        return rng.choice(list(WIRE_DTYPES) + list(COMPRESSIONS))
    if choice in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(random_json(rng, depth + 1)): random_json(rng, depth + 1) for _ in range(3)}


KINDS = [
    FrameKind.FORWARD,
    FrameKind.BACKWARD,
    FrameKind.SMASHED,
    FrameKind.OUTPUT_GRADIENT,
    FrameKind.EVALUATE,
]


def batch_limits(rng: random.Random) -> FrameLimits:
    """Limits of a split server: activations of a random shape and labels, for a few kinds."""
    shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 3)))
    dtypes = frozenset(rng.sample([torch.float32, torch.float64, torch.float16], rng.randint(1, 2)))
    compressions = frozenset(rng.sample(COMPRESSIONS, rng.randint(1, len(COMPRESSIONS))))
    if not dtypes & {torch.float32, torch.float64}:
        compressions |= {"none"}
    activations = TensorSpec(dtypes, shape, compressions=compressions)
    labels = TensorSpec(frozenset({torch.int64}), (), required=rng.random() < 0.8)
    extra = TensorSpec(frozenset({torch.int32}), (2,), batch=False, required=False)
    kinds = {
        FrameKind.FORWARD: {"activations": activations, "labels": labels},
        FrameKind.SMASHED: {"activations": activations},
        FrameKind.OUTPUT_GRADIENT: {"gradient": activations, "mask": extra},
    }
    chosen = rng.sample(list(kinds), rng.randint(1, 3))
    return FrameLimits(
        kinds={kind: kinds[kind] for kind in chosen},
        max_batch=rng.randint(0, 6),
        max_header_bytes=rng.choice([256, 4096, 64 * 1024]),
        max_scalars=rng.randint(0, 3),
    )


def frame_for(rng: random.Random, limits: FrameLimits) -> tuple[Frame, str]:
    """A frame that ``limits`` accept, or one that misses them by a little; and its codec."""
    kind = rng.choice(list(limits.kinds))
    batch = rng.randint(0, limits.max_batch + 1)
    tensors = {}
    for name, spec in limits.kinds[kind].items():
        if not spec.required and rng.random() < 0.5:
            continue
        dtype = rng.choice(sorted(spec.dtypes, key=str))
        shape = ([batch] if spec.batch else []) + list(spec.shape)
        if rng.random() < 0.1:
            shape = shape[:-1] if shape and rng.random() < 0.5 else [*shape, 1]
        tensors[name] = random_tensor(rng, dtype, shape)
    if rng.random() < 0.1:
        tensors[rng.choice(["labels", "extra", "activations"])] = random_tensor(
            rng, torch.int64, [batch]
        )
    scalars = {f"s{i}": rng.random() for i in range(rng.randint(0, limits.max_scalars + 1))}
    codec = rng.choice(COMPRESSIONS)
    return Frame(kind, rng.randint(0, 100), tensors=tensors, scalars=scalars), codec


def any_frame(rng: random.Random) -> tuple[Frame, str]:
    """A frame of random tensors of every wire dtype, scalars and codec."""
    tensors = {}
    for index in range(rng.randint(0, 4)):
        dtype = rng.choice(list(WIRE_DTYPES.values()))
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        tensors[rng.choice(["activations", "labels", "gradient", f"t{index}"])] = random_tensor(
            rng, dtype, shape
        )
    scalars: dict[str, int | float | str | bool] = {}
    for _ in range(rng.randint(0, 3)):
        scalars[rng.choice(["loss", "correct", "error", "ok"])] = rng.choice(
            [rng.random(), rng.randint(-(2**63), 2**63 - 1), "bad batch", True, float("nan")]
        )
    kind = rng.choice(KINDS)
    return Frame(kind, rng.randint(-(2**63), 2**63 - 1), tensors, scalars), rng.choice(COMPRESSIONS)


def encode(frame: Frame, codec: str) -> bytes:
    """``frame`` encoded with ``codec``, or without compression where the codec refuses it."""
    try:
        return encode_frame(frame, compression=codec)
    except WireFormatError:  # NaN with int8, values beyond float16
        return encode_frame(frame)


def split_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and payload of a frame made by :func:`encode_frame`."""
    (length,) = struct.unpack_from("<I", data)
    return json.loads(data[4 : 4 + length]), data[4 + length :]


def join_frame(header_text: str, payload: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<I", len(raw)) + raw + payload


_MARK = "\u0001mark\u0001"


def mutate_header(rng: random.Random, header: Any) -> str:
    """The JSON text of ``header`` with one random field changed, dropped or added."""
    value = random_json(rng) if rng.random() < 0.5 else _MARK
    literal = rng.choice(EXTREME_LITERALS)
    if not isinstance(header, dict):
        return json.dumps(header)
    entries = header.get("tensors")
    entries = entries if isinstance(entries, list) else []
    candidates = [e for e in entries if isinstance(e, list) and len(e) >= 4]
    entry = rng.choice(candidates) if candidates else None
    shape = entry[2] if entry and isinstance(entry[2], list) and entry[2] else None
    choice = rng.randrange(12)
    if choice == 0 or (choice in (1, 2, 3, 4) and entry is None):
        header[rng.choice(["kind", "step", "scalars", "tensors", "other"])] = value
    elif choice == 1:
        assert entry is not None
        entry[rng.randrange(len(entry))] = value
    elif choice == 2 and shape is not None:
        shape[rng.randrange(len(shape))] = value
    elif choice == 2:
        assert entry is not None
        entry[2] = value
    elif choice == 3:
        assert entry is not None
        if rng.random() < 0.5:
            entry.append(value)
        else:
            entry.pop(rng.randrange(len(entry)))
    elif choice == 4:
        assert entry is not None
        if isinstance(entry[3], int):
            entry[3] += rng.choice([-1, 1, -entry[3], 2**31, 2**63])
    elif choice == 5:
        header.pop(rng.choice(["kind", "step", "scalars", "tensors"]), None)
    elif choice == 6 and entry is not None:
        entries.append(list(entry))
    elif choice == 6:
        header["tensors"] = [value]
    elif choice == 7:
        header["scalars"] = {f"s{i}": value for i in range(rng.choice([1, 20, 2000]))}
    elif choice == 8:
        text = json.dumps(header)
        return text.replace("{", '{"kind": "forward", ', 1)  # a key twice
    elif choice == 9:
        text = json.dumps(header)
        numbers = list(re.finditer(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text))
        if numbers:
            match = rng.choice(numbers)
            return text[: match.start()] + literal + text[match.end() :]
        return text
    elif choice == 10:
        header["scalars"] = {"x": _MARK}
    else:
        entries.reverse()
    if value is _MARK or choice == 10:
        text = json.dumps(header)
        return text.replace(json.dumps(_MARK), literal, 1)
    return json.dumps(header)


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, inserted or appended, or a wrong length prefix."""
    choice = rng.randrange(6)
    if choice == 0:
        return data[: rng.randrange(len(data) + 1)]
    if choice == 1:
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        return bytes(damaged)
    if choice == 2:
        (length,) = struct.unpack_from("<I", data)
        length = rng.choice([0, length - 1, length + 1, len(data), 2**32 - 1, 1 << 20])
        return struct.pack("<I", max(0, min(length, 2**32 - 1))) + data[4:]
    if choice == 3:
        where = rng.randrange(len(data) + 1)
        return data[:where] + rng.randbytes(rng.randint(1, 8)) + data[where:]
    if choice == 4:
        return data + rng.randbytes(rng.randint(1, 16))
    damaged = bytearray(data)
    where = rng.randrange(len(damaged))
    damaged[where] = rng.choice(b'[]{}",:0\\\xff')
    return bytes(damaged)


def random_input(rng: random.Random) -> tuple[bytes, FrameLimits | None]:
    """One input for the decoder and the limits to decode it with, if any."""
    limits = batch_limits(rng) if rng.random() < 0.5 else None
    choice = rng.randrange(10)
    if choice == 0:  # random bytes, some with a plausible length prefix
        body = rng.randbytes(rng.randrange(64))
        prefix = struct.pack("<I", rng.choice([len(body), rng.randrange(64), 2**32 - 1]))
        return (prefix if rng.random() < 0.5 else b"") + body, limits
    if choice == 1:  # random JSON as a header
        text = json.dumps(random_json(rng))
        return join_frame(text, rng.randbytes(rng.randrange(16))), limits
    frame, codec = frame_for(rng, limits) if limits is not None else any_frame(rng)
    data = encode(frame, codec)
    if choice in (2, 3):
        return data, limits
    if choice in (4, 5, 6, 7):
        header, payload = split_frame(data)
        text = mutate_header(rng, header)
        if rng.random() < 0.3:
            text = mutate_header(rng, json.loads(text)) if _is_json(text) else text
        return join_frame(text, payload), limits
    return damage_bytes(rng, data), limits


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- the run -----------------------------------------------------------------------------------


def check_one(data: bytes, limits: FrameLimits | None) -> tuple[bool, str | None, str]:
    """Decode ``data``; return whether it decoded, a problem if any, and the refusal's message."""
    try:
        frame = decode_frame(data, limits=limits)
    except Exception as error:  # every exception is looked at, none may pass unseen
        return False, problem_with(error, data), str(error)
    if limits is not None:
        violation = limits_violation(frame, limits)
        if violation is not None:
            return True, f"accepted outside the limits: {violation}", ""
    return True, None, ""


FIXED_LIMITS = [None, *(batch_limits(random.Random(seed)) for seed in range(7))]
"""The limits a coverage-guided input picks from with its first byte."""


def coverage_guided(arguments: list[str], corpus_size: int = 2000) -> int:
    """Run the decoder under atheris (libFuzzer), guided by the coverage of :mod:`splitfed.wire`.

    An input's first byte picks its limits from :data:`FIXED_LIMITS`; the rest is the frame. The
    corpus starts from valid frames and their mutations; an input with a problem stops the run
    and is written to a ``crash-*`` file. ``arguments`` go to libFuzzer, e.g.
    ``-max_total_time=600 -max_len=4096 CORPUS_DIR``.
    """
    import atheris  # noqa: PLC0415  (optional: pip install atheris)

    from splitfed import wire  # noqa: PLC0415

    for value in vars(wire).values():
        functions = vars(value).values() if isinstance(value, type) else [value]
        for function in functions:
            if callable(function) and getattr(function, "__module__", None) == wire.__name__:
                atheris.instrument_func(function)
    directories = [a for a in arguments if not a.startswith("-")]
    if directories:
        rng = random.Random(0)
        for index in range(corpus_size):
            choice = index % len(FIXED_LIMITS)
            limits = FIXED_LIMITS[choice]
            frame, codec = any_frame(rng) if limits is None else frame_for(rng, limits)
            with open(f"{directories[0]}/seed-{index}", "wb") as file:
                file.write(bytes([choice]) + encode(frame, codec))

    def one_input(raw: bytes) -> None:
        if not raw:
            return
        limits = FIXED_LIMITS[raw[0] % len(FIXED_LIMITS)]
        _, problem, _ = check_one(raw[1:], limits)
        if problem is not None:
            raise AssertionError(problem)

    atheris.Setup([sys.argv[0], *arguments], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500_000, help="most inputs to try")
    parser.add_argument("--seconds", type=float, default=600.0, help="most seconds to run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--atheris",
        action="store_true",
        help="run coverage-guided under atheris instead; other arguments go to libFuzzer",
    )
    args, rest = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    if args.atheris:
        return coverage_guided(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    rng = random.Random(args.seed)
    tried = decoded = refused = 0
    reasons: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, bytes] = {}
    start = time.monotonic()
    while tried < args.examples and time.monotonic() - start < args.seconds:
        data, limits = random_input(rng)
        ok, problem, message = check_one(data, limits)
        tried += 1
        decoded += ok
        refused += not ok
        if message:
            reasons[refusal_reason(message)] += 1
        if problem is not None:
            problems[problem] += 1
            examples.setdefault(problem, data[:300])
        if tried % 50_000 == 0:
            print(f"{tried} inputs, {time.monotonic() - start:.0f} s", file=sys.stderr)
    elapsed = time.monotonic() - start
    print(
        f"tried {tried} inputs in {elapsed:.0f} s ({tried / elapsed:.0f}/s): {decoded} decoded, "
        f"{refused} refused, {sum(problems.values())} with a problem"
    )
    print(f"\n{len(reasons)} distinct reasons for refusing; the most common:")
    for reason, count in reasons.most_common(40):
        print(f"{count:9d}  {reason}")
    print(f"\n{len(problems)} distinct problems:")
    for problem, count in problems.most_common():
        print(f"{count:9d}  {problem}\n           input: {examples[problem]!r}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
