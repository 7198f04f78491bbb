"""The benchmark's measurements: each returns :class:`~simulation.benchmark.stats.Repeated`
figures measured against a baseline run in the same process on the same data."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
from torch import nn

from splitfed import SplitModel, SplitServer, make_trainer
from splitfed.protocol import (
    METADATA_MODE,
    METADATA_NODE,
    METADATA_ROUND,
    METADATA_TOKEN,
    STREAM_METHOD,
    Mode,
)
from splitfed.wire import Frame, FrameKind, encode_frame

from .clients import OPTIMIZER, client_process, per_message_client_app, unsplit_seconds
from .models import WORKLOADS, Workload, batches, synthetic_partition, weighted_average
from .stats import Repeated

__all__ = [
    "Overhead",
    "SplitRun",
    "StepOverhead",
    "frame_bytes",
    "measure_overhead",
    "measure_scaling",
    "measure_step",
    "message_per_batch",
    "state_bytes",
]


def _context() -> mp.context.BaseContext:
    # Client processes fork from a server process that has imported torch once: they start in
    # a fraction of a second, without the parent's threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "simulation.benchmark.clients"])
    return ctx


def train_unsplit(
    model: nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]], *, threads: int
) -> float:
    """Seconds to train ``model`` one pass over ``data`` with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return unsplit_seconds(model, list(data))
    finally:
        torch.set_num_threads(previous)


@dataclass
class SplitRun:
    """A split server in this process and client processes (one torch thread each), kept for
    several rounds, talking over gRPC on loopback."""

    workload: Workload
    variant: str
    samples: int
    num_clients: int
    compression: str = "none"
    server_threads: int | None = None
    split: SplitModel = field(init=False)
    server: SplitServer = field(init=False)
    round_number: int = 0
    last_bytes: int = 0
    last_examples: int = 0
    client_step_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.split = self.workload.split()
        self.client_state = self.split.client_half.state_dict()
        trainer = make_trainer(
            self.variant, server_half=copy.deepcopy(self.split.server_half), optimizer=OPTIMIZER
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
        self.client_state = weighted_average([reply[0] for reply in replies], weights)
        trainer = self.server.trainer
        copies = trainer.client_copies(node_ids)
        if copies:
            trainer.load_merged(
                weighted_average([copies[n].state_dict() for n in node_ids], weights)
            )
        seconds = time.perf_counter() - started
        self.last_bytes = stats.data_plane_bytes
        self.last_examples = sum(weights)
        self.client_step_seconds = [reply[3] / max(reply[2], 1) for reply in replies]
        return seconds

    def client_unsplit_step_seconds(self) -> float:
        """Seconds per step of the unsplit model in the first client's process, on its data."""
        self.pipes[0].send("unsplit")
        seconds = self.pipes[0].recv()
        steps = -(-self.samples // self.workload.batch_size)
        return seconds / steps

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
        self.server.stop(grace=None)


# -- the data plane's overhead per step -----------------------------------------------------------


@dataclass
class StepOverhead:
    """One client's step through the split server against the same step of the unsplit model,
    both timed in the client's process (one torch thread each side)."""

    split: Repeated
    unsplit: Repeated

    @property
    def added(self) -> float:
        """Seconds the data plane adds to a step: the difference of the minimums."""
        return self.split.min - self.unsplit.min


def measure_step(workload: Workload, *, steps: int, repeats: int) -> StepOverhead:
    """Seconds per step of one client: through the SFLV1 split server, and unsplit."""
    run = SplitRun(
        workload=workload,
        variant="v1",
        samples=steps * workload.batch_size,
        num_clients=1,
        server_threads=1,
    )
    try:
        run.round()  # connections, allocator and caches warm up
        run.client_unsplit_step_seconds()
        split, unsplit = Repeated(), Repeated()
        for _ in range(repeats):  # interleaved, so that a busy spell slows both
            run.round()
            split.add(run.client_step_seconds[0])
            unsplit.add(run.client_unsplit_step_seconds())
        return StepOverhead(split=split, unsplit=unsplit)
    finally:
        run.close()


# -- parallel clients against unsplit training ---------------------------------------------------


@dataclass
class Overhead:
    """A steady SplitFed round against unsplit training of the same samples in one process."""

    workload: str
    variant: str
    clients: int
    samples: int
    split: Repeated
    unsplit: dict[int, Repeated]
    """By torch threads: 1 and all cores."""
    first_round: float

    @property
    def baseline(self) -> Repeated:
        """The faster unsplit setting (by its minimum)."""
        return min(self.unsplit.values(), key=lambda r: r.min)

    @property
    def ratio(self) -> float:
        return self.split.min / self.baseline.min

    @property
    def noisy(self) -> bool:
        return self.split.noisy or any(r.noisy for r in self.unsplit.values())


def measure_overhead(
    workload: Workload,
    *,
    variant: str,
    samples: int,
    num_clients: int,
    repeats: int,
    server_threads: int | None = None,
) -> Overhead:
    """A steady round of ``num_clients`` clients against unsplit training on their samples."""
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
        server_threads=server_threads,
    )
    cores = os.cpu_count() or 1
    try:
        first = run.round()
        split = Repeated()
        unsplit = {threads: Repeated() for threads in sorted({1, cores})}
        for _ in range(repeats):  # interleaved: a busy spell slows both sides
            split.add(run.round())
            for threads, series in unsplit.items():
                series.add(train_unsplit(workload.build(), data, threads=threads))
        return Overhead(
            workload=workload.name,
            variant=variant,
            clients=num_clients,
            samples=samples,
            split=split,
            unsplit=unsplit,
            first_round=first,
        )
    finally:
        run.close()


# -- one Flower message per batch -----------------------------------------------------------------


def message_per_batch(workload: Workload, *, steps: int, repeats: int) -> tuple[Repeated, Repeated]:
    """Seconds per step through the data plane and through one Flower message per batch."""
    plane = measure_step(workload, steps=steps, repeats=repeats).split
    flower = Repeated()
    for _ in range(repeats):
        flower.add(_flower_message_step_seconds(workload, steps=steps))
    return plane, flower


def _flower_message_step_seconds(workload: Workload, *, steps: int) -> float:
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
    return float(result)


def _flower_per_message(conn: Connection, workload_name: str, steps: int) -> None:
    import logging  # noqa: PLC0415
    import statistics  # noqa: PLC0415

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
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
    (length,) = struct.unpack_from("<I", template)
    header = json.loads(template[4 : 4 + length])
    del header["step"]
    payload = template[4 + length :]
    trainer = make_trainer("v1", server_half=split.server_half, optimizer=OPTIMIZER)
    server = SplitServer.for_split(
        split,
        trainer=trainer,
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
                    (METADATA_MODE, Mode.TRAIN),
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
