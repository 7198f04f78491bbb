"""How fast SplitFed is, as ratios measured side by side: ``python -m simulation.benchmark``.

Every ratio is measured in one process on the same data and is the median of ``--repeats``
repetitions, the two sides interleaved so that a noisy machine slows both alike:

- **overhead vs the limit**: the wall time of one steady-state SplitFed round (the split server
  in this process, every client in its own process with one torch thread, as Flower's
  simulation runs ClientApps, talking to it over real gRPC on loopback; then FedAvg of the client
  halves and, for SFLV1, of the server-half copies), divided by the time to train the unsplit
  model in one process on the same samples with the same batch size (the faster of 1 and 2 torch
  threads). With ``c`` cores the limit is ``1/c``.
- **one Flower message per batch**: the same split step driven by a ``send_and_receive`` round
  trip per batch through Flower's simulation engine, per step, against the data plane's step.
- **bytes per sample** on the data plane (per compression) and for model sync, next to FedAvg of
  the full model for the same clients.
- **client cost**: parameters, forward+backward FLOPs per sample and training memory of the
  client half, next to the full model.
- ``--scaling``: the SFLV1 split server's throughput with 1 to 16 concurrent clients that only
  send batches (no client compute), so the server's own limits show.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import nn

from splitfed import (
    SplitModel,
    SplitServer,
    make_trainer,
)
from splitfed.protocol import METADATA_NODE, METADATA_ROUND, METADATA_TOKEN, STREAM_METHOD
from splitfed.wire import COMPRESSIONS, Frame, FrameKind, encode_frame

from .clients import OPTIMIZER, client_process, per_message_client_app
from .models import WORKLOADS, Workload, batches, synthetic_partition

__all__ = ["main"]


def _context() -> mp.context.BaseContext:
    # Client processes fork from a server process that has imported torch once: they start in
    # a fraction of a second, without the parent's threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "simulation.benchmark.clients"])
    return ctx


# -- the two sides of the overhead ratio ---------------------------------------------------------


def train_unsplit(
    model: nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]], *, threads: int
) -> float:
    """Seconds to train ``model`` one pass over ``data`` with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        optimizer = OPTIMIZER.build(model.parameters())
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        started = time.perf_counter()
        for inputs, labels in data:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels).backward()
            optimizer.step()
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


def _average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    averaged = {}
    for key, reference in states[0].items():
        value = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        averaged[key] = value.to(reference.dtype)
    return averaged


@dataclass
class SplitRun:
    """A split server and its client processes, kept for several rounds."""

    workload: Workload
    variant: str
    samples: int
    num_clients: int
    compression: str = "none"
    server_threads: int | None = None
    split: SplitModel = field(init=False)
    server: SplitServer = field(init=False)
    startup_seconds: float = 0.0
    round_number: int = 0
    last_bytes: int = 0
    last_examples: int = 0
    last_steps: int = 0
    client_step_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        started = time.perf_counter()
        self.split = self.workload.split()
        self.client_state = self.split.client_half.state_dict()
        trainer = make_trainer(
            self.variant,
            server_half=copy.deepcopy(self.split.server_half),
            optimizer=OPTIMIZER,
        )
        self.server = SplitServer(
            trainer=trainer,
            activation_shape=self.split.activation_shape,
            activation_dtype=self.split.activation_dtype,
            insecure=True,
            intra_op_threads=self.server_threads,
        )
        self.server.start()
        ctx = _context()
        self.pipes: list[Connection] = []
        self.processes = []
        for client in range(self.num_clients):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=client_process,
                args=(child, self.workload.name, client, self.samples, False),
                daemon=True,
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            pipe.recv()
        self.startup_seconds = time.perf_counter() - started

    def round(self) -> float:
        """Run one round; return its wall time (data plane and both merges)."""
        self.round_number += 1
        node_ids = list(range(1, self.num_clients + 1))
        started = time.perf_counter()
        tokens = self.server.open_round(self.round_number, node_ids)
        for node_id, pipe in zip(node_ids, self.pipes, strict=True):
            pipe.send(
                (
                    self.server.address,
                    node_id,
                    self.round_number,
                    tokens[node_id],
                    self.client_state,
                    self.compression,
                )
            )
        replies = [pipe.recv() for pipe in self.pipes]
        stats = self.server.close_round()
        weights = [reply[1] for reply in replies]
        self.client_state = _average([reply[0] for reply in replies], weights)
        trainer = self.server.trainer
        copies = trainer.client_copies(node_ids)
        if copies:
            trainer.load_merged(_average([copies[n].state_dict() for n in node_ids], weights))
        seconds = time.perf_counter() - started
        self.last_bytes = stats.data_plane_bytes
        self.last_examples = sum(weights)
        self.last_steps = sum(reply[2] for reply in replies)
        self.client_step_seconds = [reply[3] / max(reply[2], 1) for reply in replies]
        return seconds

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
        self.server.stop(grace=None)


@dataclass
class OverheadResult:
    workload: str
    variant: str
    samples: int
    startup_seconds: float
    first_round_seconds: float
    split_seconds: float
    unsplit_seconds: dict[int, float]
    ratio: float
    bytes_per_sample: float
    data_plane_step_ms: float


def measure_overhead(
    workload: Workload,
    *,
    variant: str,
    samples: int,
    num_clients: int,
    repeats: int,
    server_threads: int | None = None,
    compression: str = "none",
) -> OverheadResult:
    """Median ratio of a steady SplitFed round to unsplit training on the same samples."""
    data = [
        batch
        for client in range(num_clients)
        for batch in batches(
            *synthetic_partition(workload, client=client, samples=samples), workload.batch_size
        )
    ]
    run = SplitRun(
        workload=workload,
        variant=variant,
        samples=samples,
        num_clients=num_clients,
        compression=compression,
        server_threads=server_threads,
    )
    try:
        first = run.round()  # connections, allocator and caches warm up
        split_times, unsplit_times, ratios = [], {1: [], 2: []}, []
        for _ in range(repeats):
            split_times.append(run.round())
            for threads in (1, 2):
                unsplit_times[threads].append(
                    train_unsplit(workload.build(), data, threads=threads)
                )
            best = min(unsplit_times[1][-1], unsplit_times[2][-1])
            ratios.append(split_times[-1] / best)
        return OverheadResult(
            workload=workload.name,
            variant=variant,
            samples=run.last_examples,
            startup_seconds=run.startup_seconds,
            first_round_seconds=first,
            split_seconds=statistics.median(split_times),
            unsplit_seconds={t: statistics.median(v) for t, v in unsplit_times.items()},
            ratio=statistics.median(ratios),
            bytes_per_sample=run.last_bytes / run.last_examples,
            data_plane_step_ms=1e3 * statistics.median(run.client_step_seconds),
        )
    finally:
        run.close()


# -- one Flower message per batch -----------------------------------------------------------------


def data_plane_step_seconds(workload: Workload, *, steps: int) -> float:
    """Median seconds per step of one client training through the split server (client here)."""
    run = SplitRun(
        workload=workload, variant="v1", samples=steps * workload.batch_size, num_clients=1
    )
    try:
        run.round()
        return statistics.median(run.round() / run.last_steps for _ in range(3))
    finally:
        run.close()


def flower_message_step_seconds(workload: Workload, *, steps: int) -> float:
    """Median seconds per step when every batch is a Flower message round trip (simulation).

    Runs in a child process: Flower's simulation engine starts Ray, which is best left behind
    in a process of its own.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_flower_per_message, args=(child, workload.name, steps))
    process.start()
    result = parent.recv()
    process.join(timeout=60)
    if isinstance(result, str):
        raise RuntimeError(f"the per-message Flower run failed: {result}")
    return result


def _flower_per_message(conn: Connection, workload_name: str, steps: int) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging  # noqa: PLC0415

    from flwr.app import Array, ArrayRecord, Message, RecordDict  # noqa: PLC0415
    from flwr.serverapp import ServerApp  # noqa: PLC0415
    from flwr.simulation import run_simulation  # noqa: PLC0415

    logging.getLogger("flwr").setLevel(logging.WARNING)
    workload = WORKLOADS[workload_name]
    times: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:  # noqa: ANN001
        split = workload.split()
        trainer = make_trainer("v2", server_half=split.server_half, optimizer=OPTIMIZER)
        node = next(iter(grid.get_node_ids()))
        trainer.begin_round([node])
        gradient: dict[str, Array] = {}
        for _ in range(steps + 2):
            started = time.perf_counter()
            message = Message(
                RecordDict({"gradient": ArrayRecord(gradient)}),
                dst_node_id=node,
                message_type="train",
            )
            (reply,) = grid.send_and_receive([message])
            batch = reply.content.array_records["batch"]
            result = trainer.step(
                node,
                torch.from_numpy(batch["activations"].numpy()),
                torch.from_numpy(batch["labels"].numpy()),
            )
            gradient = {"gradient": Array(result.cut_gradient.numpy())}
            times.append(time.perf_counter() - started)
        trainer.close()

    try:
        run_simulation(
            server_app=server_app,
            client_app=per_message_client_app(workload_name),
            num_supernodes=1,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": False},
            },
        )
        conn.send(statistics.median(times[2:]) if len(times) > 2 else "no steps ran")
    except Exception as err:  # noqa: BLE001 - reported to the parent
        conn.send(repr(err))


# -- bytes and client cost ------------------------------------------------------------------------


def frame_bytes(split: SplitModel, batch_size: int, compression: str) -> int:
    """Wire bytes of one batch up and its gradient down, as the split server counts them."""
    activations = torch.randn(batch_size, *split.activation_shape)
    labels = torch.randint(0, 10, (batch_size,))
    up = Frame(FrameKind.FORWARD, 1, tensors={"activations": activations, "labels": labels})
    down = Frame(
        FrameKind.BACKWARD,
        1,
        tensors={"gradient": activations},
        scalars={"loss": 2.302585, "correct": 3},
    )
    return sum(len(encode_frame(f, compression=compression)) for f in (up, down))


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@dataclass
class Cost:
    parameters: int
    flops_per_sample: float
    training_memory_bytes: int


def training_cost(module: nn.Module, inputs: torch.Tensor, *, output_grad: bool) -> Cost:
    """Parameters, forward+backward FLOPs per sample, and training memory of one step.

    Training memory: parameters, their gradients and SGD momentum, plus every tensor autograd
    saves for the backward pass (counted once per storage).
    """
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    module = copy.deepcopy(module).train()
    parameters = sum(p.numel() for p in module.parameters())
    with FlopCounterMode(display=False) as counter:
        out = module(inputs)
        loss = (
            out.square().mean()
            if output_grad
            else nn.functional.cross_entropy(out, torch.zeros(len(inputs), dtype=torch.long))
        )
        loss.backward()
    flops = counter.get_total_flops() / len(inputs)

    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(inputs)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return Cost(parameters, flops, 3 * param_bytes + sum(saved.values()))


# -- the split server's scaling -------------------------------------------------------------------


def measure_scaling(
    workload: Workload,
    *,
    clients: Sequence[int],
    steps: int,
    server_threads: int | None = None,
) -> dict[int, float]:
    """SFLV1 server throughput (batches/s) for each number of concurrent sending clients."""
    from .load import stream_batches  # noqa: PLC0415

    split = workload.split()
    activations = torch.randn(workload.batch_size, *split.activation_shape)
    labels = torch.randint(0, 10, (workload.batch_size,))
    template = encode_frame(
        Frame(FrameKind.FORWARD, 0, tensors={"activations": activations, "labels": labels})
    )
    import json  # noqa: PLC0415
    import struct  # noqa: PLC0415

    (length,) = struct.unpack_from("<I", template)
    header = json.loads(template[4 : 4 + length])
    del header["step"]
    payload = template[4 + length :]
    trainer = make_trainer("v1", server_half=split.server_half, optimizer=OPTIMIZER)
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        activation_dtype=split.activation_dtype,
        insecure=True,
        intra_op_threads=server_threads,
    )
    server.start()
    ctx = mp.get_context("spawn")  # the load generators do not need torch
    throughput = {}
    try:
        for round_number, n in enumerate(clients, start=1):
            node_ids = list(range(1, n + 1))
            tokens = server.open_round(round_number, node_ids)
            pipes, processes = [], []
            for node_id in node_ids:
                parent, child = ctx.Pipe()
                metadata = (
                    (METADATA_NODE, str(node_id)),
                    (METADATA_ROUND, str(round_number)),
                    (METADATA_TOKEN, tokens[node_id]),
                )
                process = ctx.Process(
                    target=stream_batches,
                    args=(child,),
                    kwargs={
                        "address": server.address,
                        "method": STREAM_METHOD,
                        "metadata": metadata,
                        "header": header,
                        "payload": payload,
                        "steps": steps,
                    },
                    daemon=True,
                )
                process.start()
                pipes.append(parent)
                processes.append(process)
            for pipe in pipes:
                pipe.recv()
            for pipe in pipes:
                pipe.send("go")
            results = [pipe.recv() for pipe in pipes]
            for process in processes:
                process.join(timeout=10)
            server.close_round()
            started = min(r[0] for r in results)
            ended = max(r[1] for r in results)
            throughput[n] = sum(r[2] for r in results) / (ended - started)
    finally:
        server.stop(grace=None)
    return throughput


# -- the command ----------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU"
        if not torch.cuda.is_available()
        else "CUDA"
    )


def _app_server_threads(variant: str) -> int:
    """Torch threads of the split server as the app sets them (see simulation/server_app.py)."""
    return 1 if variant == "v1" else os.cpu_count() or 1


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="scale down (fewer samples and clients) for a smoke test",
    )
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repetitions per ratio (default: 5, 1 with --quick)",
    )
    parser.add_argument(
        "--flower-steps",
        type=int,
        default=None,
        help="batches driven by Flower messages (default: 30; 0, skipped, with --quick: "
        "Ray's start-up alone outlasts a smoke test)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also measure the SFLV1 split server with 1-16 concurrent clients",
    )
    parser.add_argument(
        "--scaling-steps",
        type=int,
        default=200,
        help="batches each client sends in the scaling test",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads for the server half (default: the trainer's)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    flower_steps = args.flower_steps if args.flower_steps is not None else (0 if args.quick else 30)

    out(f"Machine: {_machine()}")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    out(f"Command: python -m simulation.benchmark {shown}".rstrip())
    out("Clients: one process each, one torch thread, over gRPC on loopback.\n")

    # The overhead table prints row by row: the full run takes a while.
    overhead_headers = [
        "workload",
        "clients x samples",
        "split round s",
        "unsplit s (1 / 2 threads)",
        "ratio",
        "limit (1/cores)",
        "start-up s (+ first round)",
    ]
    out("Overhead vs the limit: steady SplitFed round / unsplit training, same samples")
    for line in _table(overhead_headers, []).splitlines():
        out(line)
    byte_rows, cost_rows = [], []
    for name in args.workloads:
        workload = WORKLOADS[name]
        samples = workload.quick_samples_per_client if args.quick else workload.samples_per_client
        num_clients = min(workload.num_clients, 4) if args.quick else workload.num_clients
        for variant in args.variants:
            result = measure_overhead(
                workload,
                variant=variant,
                samples=samples,
                num_clients=num_clients,
                repeats=repeats,
                server_threads=args.server_threads or _app_server_threads(variant),
            )
            row = [
                f"{name} SFL{variant.upper()}",
                f"{num_clients} x {samples:,}",
                f"{result.split_seconds:.2f}",
                f"{result.unsplit_seconds[1]:.2f} / {result.unsplit_seconds[2]:.2f}",
                f"**{result.ratio:.2f}**",
                f"{1 / os.cpu_count():.2f}",
                f"{result.startup_seconds:.2f} + {result.first_round_seconds:.2f}",
            ]
            out(_table(overhead_headers, [row]).splitlines()[-1])
        split = workload.split()
        full = split.full_model()
        sync = 2 * state_bytes(split.client_half) * num_clients
        fedavg = 2 * state_bytes(full) * num_clients
        total = samples * num_clients
        for compression in COMPRESSIONS:
            per_batch = frame_bytes(split, workload.batch_size, compression)
            byte_rows.append(
                [
                    name,
                    compression,
                    f"{per_batch / workload.batch_size:,.0f}",
                    f"{sync / total:,.1f}",
                    f"{fedavg / total:,.1f}",
                    f"{(per_batch / workload.batch_size * total + sync) / 1e6:,.1f} MB",
                    f"{fedavg / 1e6:,.2f} MB",
                ]
            )
        inputs = synthetic_partition(workload, client=0, samples=workload.batch_size)[0]
        client_cost = training_cost(split.client_half, inputs, output_grad=True)
        full_cost = training_cost(full, inputs, output_grad=False)
        cost_rows.append(
            [
                name,
                f"{client_cost.parameters:,} / {full_cost.parameters:,}",
                f"{client_cost.flops_per_sample / 1e6:,.2f} / "
                f"{full_cost.flops_per_sample / 1e6:,.2f}",
                f"{client_cost.training_memory_bytes / 2**20:,.2f} / "
                f"{full_cost.training_memory_bytes / 2**20:,.2f}",
                f"{client_cost.flops_per_sample / full_cost.flops_per_sample:.1%}",
            ]
        )

    if flower_steps > 0:
        workload = WORKLOADS["W1"]
        plane = data_plane_step_seconds(workload, steps=max(flower_steps, 20))
        flower = flower_message_step_seconds(workload, steps=flower_steps)
        out("\nOne Flower message per batch (simulation engine) vs the data plane, W1, 1 client")
        out(
            _table(
                ["path", "ms per step", "ratio"],
                [
                    ["data plane (gRPC stream)", f"{plane * 1e3:.2f}", "1"],
                    [
                        "Flower send_and_receive per batch",
                        f"{flower * 1e3:.1f}",
                        f"**{flower / plane:.0f}**",
                    ],
                ],
            )
        )
    out("\nBytes per sample: data plane (up + down, per compression) and model sync, per round")
    out(
        _table(
            [
                "workload",
                "compression",
                "data plane B/sample",
                "model sync B/sample",
                "FedAvg full model B/sample",
                "SplitFed per round",
                "FedAvg per round",
            ],
            byte_rows,
        )
    )
    out("\nClient cost: client half / full model (training, batch of one workload batch)")
    out(
        _table(
            [
                "workload",
                "parameters",
                "fwd+bwd MFLOPs/sample",
                "training memory MiB",
                "client share of FLOPs",
            ],
            cost_rows,
        )
    )
    if args.scaling:
        workload = WORKLOADS["W1"]
        clients = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16]
        steps = 20 if args.quick else args.scaling_steps
        cores = os.cpu_count() or 1
        curves = {
            threads: measure_scaling(workload, clients=clients, steps=steps, server_threads=threads)
            for threads in (cores, 1)
        }
        out("\nSFLV1 split server throughput (W1 batches/s), clients that only send")
        out(
            _table(
                [
                    "clients",
                    f"{cores} torch threads (torch's default)",
                    "x 1 client",
                    "1 torch thread (the app's SFLV1 setting)",
                    "x 1 client",
                ],
                [
                    [n]
                    + [
                        part
                        for threads in (cores, 1)
                        for part in (
                            f"{curves[threads][n]:,.0f}",
                            f"{curves[threads][n] / curves[threads][clients[0]]:.2f}",
                        )
                    ]
                    for n in clients
                ],
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(out=lambda line: print(line, flush=True)))
