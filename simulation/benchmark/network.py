"""An emulated network between clients and the split server, and the benchmark's ``network``
section: what a round of each variant costs over links of a given delay and rate.

A :class:`Relay` is a TCP relay on loopback. A client dials the relay instead of the server; the
relay holds each chunk it reads for the link's one-way delay and paces it at the link's rate, in
each direction, then forwards it unchanged. Every connection through relays that share a
:class:`Link` shares its rate, as one client's access link would: a client's data-plane stream
and its model sync queue behind each other. A connection's first bytes wait one round trip (the
TCP handshake); after that, TCP itself runs on loopback, so its window and slow start are not
emulated, while gRPC's own (HTTP/2) flow control crosses the relay and is.

The kernel could do the same with ``tc`` (netem for the delay, tbf for the rate) in a network
namespace; :func:`kernel_shaping` says whether it can here, and the benchmark uses the relay
either way, so that its figures mean the same on every machine.

The section (:func:`run_network`) runs real rounds: the split server in this process, each client
in a process of its own (one torch thread), the data plane over real gRPC through the client's
relay, and the model sync (the global weights down, the update up) over a TCP connection through
the same link. FedAvg of the unsplit model moves its whole model the same way and trains
locally. :func:`measure_relay_overhead` measures what the relay itself adds at zero delay.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from splitfed import (
    GrpcDataPlane,
    SplitModel,
    SplitServer,
    make_trainer,
    run_local_epochs,
    run_local_loss_epochs,
)
from splitfed.protocol import GRPC_OPTIONS, SERVICE, STREAM_METHOD
from splitfed.wire import Frame, FrameKind, encode_frame

from .clients import OPTIMIZER
from .models import WORKLOADS, batches, synthetic_partition, weighted_average
from .stats import Repeated, machine, ratio

__all__ = [
    "NETWORK_PROFILES",
    "VARIANTS",
    "EmulatedNetwork",
    "KernelShaping",
    "Link",
    "LinkProfile",
    "LinkRun",
    "Relay",
    "RelayOverhead",
    "RoundFigures",
    "Task",
    "Variant",
    "kernel_shaping",
    "measure_network",
    "measure_relay_overhead",
    "relay_rate_check",
    "run_network",
]

_CHUNK = 256 * 1024
"""Most bytes the relay reads at once: a chunk is held and paced as a whole."""


# -- the link and the relay -----------------------------------------------------------------------


class _Direction:
    """One direction of a link: a FIFO that sends one bit every ``1/rate`` seconds, and the
    bytes that crossed it."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._free_at = 0.0
        self.bytes = 0

    def schedule(self, nbytes: int, now: float, not_before: float) -> float:
        """When the last byte of a chunk read at ``now`` reaches the other end: it waits for
        the chunks ahead of it, takes ``nbytes * 8 / rate`` seconds to send, then the delay."""
        with self._link._lock:
            start = max(now, self._free_at, not_before)
            rate = self._link._rate
            self._free_at = start + (nbytes * 8 / rate if rate else 0.0)
            self.bytes += nbytes
            return self._free_at + self._link._delay


class Link:
    """One client's access link: a one-way delay and a rate, the same in each direction, shared
    by every connection through every relay given this link.

    Parameters
    ----------
    delay : float (default: 0.0)
        One-way delay in seconds, in each direction (the round trip is twice this).
    rate : float | None (default: None)
        Bits per second in each direction; ``None`` is unlimited.
    """

    def __init__(self, *, delay: float = 0.0, rate: float | None = None) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0
        self._rate: float | None = None
        self.up = _Direction(self)
        """Client to server."""
        self.down = _Direction(self)
        """Server to client."""
        self.set(delay=delay, rate=rate)

    def set(self, *, delay: float, rate: float | None) -> None:
        """Change the delay and rate (between rounds; chunks already read keep their times)."""
        if not delay >= 0:
            raise ValueError(f"delay must be at least 0 seconds; got {delay}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive (bits/s), or None for unlimited; got {rate}")
        with self._lock:
            self._delay, self._rate = float(delay), rate

    @property
    def delay(self) -> float:
        return self._delay

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def bytes(self) -> int:
        """Bytes that crossed the link, both directions."""
        return self.up.bytes + self.down.bytes

    def reset_counters(self) -> None:
        with self._lock:
            self.up.bytes = self.down.bytes = 0


class _Pump:
    """Moves one direction of a connection: a reader that stamps each chunk with when it is
    due, and a writer (started the first time a chunk has to wait) that sends it then."""

    def __init__(
        self,
        connection: _Connection,
        source: socket.socket,
        destination: socket.socket,
        direction: _Direction,
        not_before: float,
    ) -> None:
        self._connection = connection
        self._source, self._destination = source, destination
        self._direction = direction
        self._not_before = not_before
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._pending = 0  # chunks queued or being written
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._stopped = False
        self._reader = threading.Thread(target=self._read, name="relay-read", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        try:
            while True:
                n = self._source.recv_into(buffer)
                if n == 0:
                    break
                due = self._direction.schedule(n, time.monotonic(), self._not_before)
                with self._cond:
                    # Nothing ahead and nothing to wait for: send from here, which spares a
                    # thread hand-off (most of what a relay adds at zero delay).
                    now = self._pending == 0 and due <= time.monotonic()
                    if not now:
                        self._queue.append((due, bytes(view[:n])))
                        self._pending += 1
                        self._start_writer()
                        self._cond.notify()
                if now:
                    self._destination.sendall(view[:n])
        except OSError:
            pass
        # The end of the stream travels like data: the other side sees it after the delay.
        with self._cond:
            if self._pending and not self._stopped:
                due = self._direction.schedule(0, time.monotonic(), self._not_before)
                self._queue.append((due, None))
                self._pending += 1
                self._cond.notify()
                return
        self._connection.close()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="relay-write", daemon=True)
            self._writer.start()

    def _write(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                due, data = self._queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if data is None:
                self._connection.close()
                return
            try:
                self._destination.sendall(data)
            except OSError:
                self._connection.close()
                return
            with self._cond:
                if self._stopped:
                    return
                self._queue.popleft()
                self._pending -= 1

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()


class _Connection:
    """A client's connection through a relay, and the relay's connection to the target."""

    def __init__(
        self, client: socket.socket, server: socket.socket, link: Link, *, handshake: bool
    ) -> None:
        self._sockets = (client, server)
        self._lock = threading.Lock()
        self.closed = False
        # TCP's handshake: nothing crosses before one round trip after the connection opened.
        not_before = time.monotonic() + (2 * link.delay if handshake else 0.0)
        self._pumps = (
            _Pump(self, client, server, link.up, not_before),
            _Pump(self, server, client, link.down, not_before),
        )

    def close(self) -> None:
        """Close both sides (either side closing ends the connection for both)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for pump in self._pumps:
            pump.stop()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected an address 'host:port'; got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Relay:
    """A TCP relay on loopback to ``target``, over an emulated :class:`Link`.

    Clients dial :attr:`address` instead of the target. Each connection is forwarded to a
    connection of its own to the target; each chunk is held until the link delivers it (its
    wait behind earlier chunks, ``bytes * 8 / rate``, then the one-way delay), and bytes are
    forwarded unchanged. When either side closes, the other sees the end after the delay and
    both are closed (a half-closed connection is not kept; gRPC does not use one).

    Parameters
    ----------
    target : str
        ``host:port`` to forward to.
    link : Link | None (default: None)
        The link to emulate, shared with other relays of the same client; ``None`` makes one
        from ``delay`` and ``rate``.
    delay : float (default: 0.0)
        One-way delay in seconds, each direction (only without ``link``).
    rate : float | None (default: None)
        Bits per second, each direction; ``None`` is unlimited (only without ``link``).
    handshake : bool (default: True)
        Hold a new connection's first bytes for one round trip, as TCP's handshake would.
    """

    def __init__(
        self,
        *,
        target: str,
        link: Link | None = None,
        delay: float = 0.0,
        rate: float | None = None,
        handshake: bool = True,
    ) -> None:
        if link is not None and (delay or rate is not None):
            raise ValueError("pass link=..., or delay and rate, not both")
        self.target = _host_port(target)
        self.link = link if link is not None else Link(delay=delay, rate=rate)
        self.handshake = handshake
        self.address: str | None = None
        self._listener: socket.socket | None = None
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()

    def start(self) -> str:
        """Listen on a free loopback port; return the address clients dial."""
        if self._listener is not None:
            raise RuntimeError("the relay is already running")
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self.address

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, server, self.link, handshake=self.handshake)
            with self._lock:
                closing = self._listener is not listener
                if not closing:
                    self._connections = [c for c in self._connections if not c.closed]
                    self._connections.append(connection)
            if closing:  # accepted while the relay was being closed
                connection.close()
                return

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(not c.closed for c in self._connections)

    def close(self) -> None:
        """Stop listening and close every connection through the relay."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EmulatedNetwork:
    """Links and relays in a process of their own.

    The relays then never wait for this process's interpreter lock, which the split server's
    handler threads hold between their tensor operations (a thread waiting for it can wait a
    whole switch interval, 5 ms). Links are named by the number :meth:`add_link` returns.
    """

    def __init__(self) -> None:
        ctx = _context()
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(target=_network_process, args=(child,), daemon=True)
        self._process.start()
        self._lock = threading.Lock()

    def _call(self, *command: Any) -> Any:
        with self._lock:
            self._pipe.send(command)
            ok, result = self._pipe.recv()
        if not ok:
            raise RuntimeError(f"the emulated network refused {command[0]}: {result}")
        return result

    def add_link(self, *, delay: float = 0.0, rate: float | None = None) -> int:
        """A new link (see :class:`Link`); return its number."""
        return int(self._call("link", delay, rate))

    def add_relay(self, *, target: str, link: int, handshake: bool = True) -> str:
        """A relay to ``target`` over ``link``; return the address clients dial."""
        return str(self._call("relay", target, link, handshake))

    def set_link(self, link: int, *, delay: float, rate: float | None) -> None:
        self._call("set", link, delay, rate)

    def link_bytes(self, link: int) -> int:
        """Bytes that crossed ``link``, both directions, since it was last reset."""
        return int(self._call("bytes", link))

    def reset_counters(self, link: int) -> None:
        self._call("reset", link)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._pipe.send(None)
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()

    def __enter__(self) -> EmulatedNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fine_timers() -> None:
    """Let this thread's sleeps (and its new threads') end within microseconds of their
    deadline instead of Linux's default 50 us slack; best effort, Linux only."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 us


def _network_process(conn: Connection) -> None:
    _fine_timers()
    links: list[Link] = []
    relays: list[Relay] = []
    try:
        while (command := conn.recv()) is not None:
            kind, *arguments = command
            try:
                if kind == "link":
                    links.append(Link(delay=arguments[0], rate=arguments[1]))
                    result: Any = len(links) - 1
                elif kind == "relay":
                    target, link, handshake = arguments
                    relay = Relay(target=target, link=links[link], handshake=handshake)
                    result = relay.start()
                    relays.append(relay)
                elif kind == "set":
                    links[arguments[0]].set(delay=arguments[1], rate=arguments[2])
                    result = None
                elif kind == "bytes":
                    result = links[arguments[0]].bytes
                elif kind == "reset":
                    links[arguments[0]].reset_counters()
                    result = None
                else:
                    raise ValueError(f"unknown command {kind!r}")
            except Exception as err:  # noqa: BLE001 - reported to the parent
                conn.send((False, f"{type(err).__name__}: {err}"))
            else:
                conn.send((True, result))
    except (EOFError, OSError):
        pass
    finally:
        for relay in relays:
            relay.close()


# -- can the kernel do it? ------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelShaping:
    """What the kernel's traffic control can emulate here, in a network namespace of its own."""

    namespaces: bool
    rate: bool
    """``tc qdisc ... tbf`` works."""
    delay: bool
    """``tc qdisc ... netem`` works."""
    reason: str

    @property
    def usable(self) -> bool:
        return self.namespaces and self.rate and self.delay

    def describe(self) -> str:
        if self.usable:
            return (
                "tc (netem, tbf) works in a network namespace here; the figures use the relay "
                "all the same, so that they mean the same on machines where it does not"
            )
        return f"the relay alone ({self.reason})"


def kernel_shaping(timeout: float = 10.0) -> KernelShaping:
    """Try ``tc``'s tbf (rate) and netem (delay) on the loopback of a new network namespace
    (``unshare -n``, as root; ``unshare -rn`` otherwise), which vanishes with the command."""
    missing = [tool for tool in ("tc", "ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return KernelShaping(False, False, False, f"{', '.join(missing)} not found")
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]

    def works(script: str) -> tuple[bool, str]:
        try:
            done = subprocess.run(
                [*unshare, "sh", "-c", f"ip link set lo up && {script}"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, str(err)
        return done.returncode == 0, (done.stderr or done.stdout).strip().splitlines()[-1:]

    namespaces, why = works("true")
    if not namespaces:
        return KernelShaping(False, False, False, f"no network namespace: {why}")
    rate, why_rate = works("tc qdisc add dev lo root tbf rate 100mbit burst 32kbit latency 50ms")
    delay, why_delay = works("tc qdisc add dev lo root netem delay 10ms")
    reason = []
    if not rate:
        reason.append(f"tbf refused: {' '.join(why_rate)}")
    if not delay:
        reason.append(f"netem refused: {' '.join(why_delay)}")
    return KernelShaping(True, rate, delay, "; ".join(reason) or "all usable")


# -- messages over the model-sync connection ------------------------------------------------------

_HEADER = struct.Struct("!Q")


def _send_message(sock: socket.socket, message: Any) -> int:
    """Send one pickled message (between this benchmark's own processes); return its bytes."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)
    return _HEADER.size + len(data)


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ConnectionError("the other side closed the connection")
        got += count
    return bytes(buffer)


def _receive_message(sock: socket.socket) -> tuple[Any, int]:
    (length,) = _HEADER.unpack(_receive_exactly(sock, _HEADER.size))
    return pickle.loads(_receive_exactly(sock, length)), _HEADER.size + length  # noqa: S301


# -- what the server and the clients build --------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A way to train: SFLV1, SFLV2, local-loss with its ``send_every``, or FedAvg."""

    name: str
    """``"v1"``, ``"v2"``, ``"local-loss"`` or ``"fedavg"``."""
    send_every: int = 1

    @property
    def label(self) -> str:
        return {
            "v1": "SFLV1",
            "v2": "SFLV2",
            "fedavg": "FedAvg (unsplit)",
        }.get(self.name, f"local-loss k={self.send_every}")

    @property
    def split(self) -> bool:
        return self.name != "fedavg"


VARIANTS = (
    Variant("v1"),
    Variant("v2"),
    Variant("local-loss", 1),
    Variant("local-loss", 4),
    Variant("fedavg"),
)


@dataclass(frozen=True)
class Task:
    """What the server and every client build alike: a benchmark workload on synthetic data
    (``workload``, ``samples`` per client), or the app's task from a run config."""

    num_clients: int
    workload: str = ""
    samples: int = 0
    run_config: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def app(cls, run_config: Mapping[str, Any], *, num_clients: int) -> Task:
        return cls(num_clients=num_clients, run_config=tuple(sorted(run_config.items())))

    def describe(self) -> str:
        if self.workload:
            return f"{self.workload}, {self.num_clients} clients x {self.samples:,} samples"
        config = dict(self.run_config)
        return f"{config.get('dataset', 'digits')}, {self.num_clients} clients"


class _Parts:
    """A task's model, data and optimizers, on the server (``client=None``) or a client."""

    def __init__(self, task: Task, *, client: int | None) -> None:
        self.task = task
        self.client = client
        if task.workload:
            self.workload = WORKLOADS[task.workload]
            self.num_classes = 10
            self.client_optimizer = self.server_optimizer = OPTIMIZER
            self.local_epochs = 1
            self.batch = None
            if client is not None:
                inputs, labels = synthetic_partition(
                    self.workload, client=client, samples=task.samples
                )
                self._batches = batches(inputs, labels, self.workload.batch_size)
        else:
            from simulation.app.config import AppConfig  # noqa: PLC0415 - heavy, app tasks only
            from simulation.app.task import batch_spec, federated_data  # noqa: PLC0415

            self.config = AppConfig.from_run_config(dict(task.run_config))
            self.data = federated_data(self.config, num_partitions=task.num_clients)
            self.num_classes = self.data.num_classes
            self.client_optimizer = self.config.client_optimizer
            self.server_optimizer = self.config.server_optimizer
            self.local_epochs = self.config.local_epochs
            self.batch = batch_spec(self.data)

    def loader(self, server_round: int) -> Iterable[Any]:
        if self.task.workload:
            return self._batches
        from simulation.app.task import train_loader  # noqa: PLC0415

        assert self.client is not None
        return train_loader(
            self.config, self.data, partition_id=self.client, server_round=server_round
        )

    def split(self, variant: Variant) -> SplitModel:
        """The split of the task's model (seeded as the app seeds it)."""
        if self.task.workload:
            split = self.workload.split()
            if variant.name == "local-loss":
                torch.manual_seed(1)
                split = split.with_aux_head(num_classes=self.num_classes)
            return split
        from simulation.app.config import AppConfig  # noqa: PLC0415
        from simulation.app.task import model_split  # noqa: PLC0415

        config = AppConfig.from_run_config(
            {**dict(self.task.run_config), "variant": variant.name, "send-every": 1}
        )
        torch.manual_seed(config.seed)
        return model_split(config, self.data, client_side=False)

    def model(self) -> nn.Module:
        """The unsplit model (FedAvg)."""
        if self.task.workload:
            return self.workload.build()
        from simulation.app.task import whole_model  # noqa: PLC0415

        torch.manual_seed(self.config.seed)
        return whole_model(self.config, self.data)


# -- a client process -----------------------------------------------------------------------------


class _ClientState:
    """One variant's parts and optimizer in a client, kept across rounds (as ``context.state``
    keeps the app's client optimizer)."""

    def __init__(self, parts: _Parts, variant: Variant) -> None:
        self.variant = variant
        if variant.split:
            self.split = parts.split(variant)
            self.optimizer = parts.client_optimizer.build(self.split.client_parameters())
        else:
            self.model = parts.model()


def _train(parts: _Parts, state: _ClientState, request: dict[str, Any]) -> dict[str, Any]:
    variant: Variant = request["variant"]
    server_round = request["round"]
    if not variant.split:
        model = state.model
        model.load_state_dict(request["state"])
        model.train()
        # The app's FedAvg builds its optimizer afresh each round (simulation.app.fedavg).
        optimizer = parts.client_optimizer.build(model.parameters())
        unpack = parts.batch.unpack if parts.batch is not None else (lambda b: (b[0], b[1]))
        examples, steps = 0, 0
        loader = parts.loader(server_round)
        started = time.perf_counter()
        for _ in range(parts.local_epochs):
            for raw in loader:
                inputs, labels = unpack(raw)
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(inputs), labels).backward()
                optimizer.step()
                examples += len(labels)
                steps += 1
        seconds = time.perf_counter() - started
        return {"state": model.state_dict(), "examples": examples, "seconds": seconds}
    split = state.split
    split.load_client_state_dict(request["state"])
    with GrpcDataPlane(
        address=request["address"],
        node_id=request["node"],
        server_round=server_round,
        token=request["token"],
    ) as plane:
        common = {
            "split": split,
            "data_plane": plane,
            "train_loader": parts.loader(server_round),
            "optimizer": state.optimizer,
            "local_epochs": parts.local_epochs,
            "batch": parts.batch,
        }
        if variant.name == "local-loss":
            stats = run_local_loss_epochs(**common, send_every=variant.send_every)
        else:
            stats = run_local_epochs(**common)
    return {
        "state": split.client_state_dict(),
        "examples": stats.num_examples,
        "seconds": stats.seconds,
    }


def _client_process(conn: Connection, task: Task, client: int, sync_address: str) -> None:
    """One client: dials the model-sync server through its link, then trains what each message
    asks for (the variant, its weights, the split server's address through the link and a
    credential) and sends its update back; ends on ``None``."""
    torch.set_num_threads(1)
    try:
        parts = _Parts(task, client=client)
        sock = socket.create_connection(_host_port(sync_address), timeout=60)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send_message(sock, client)
    except Exception:  # noqa: BLE001 - reported to the parent
        conn.send(traceback.format_exc())
        return
    conn.send("ready")
    states: dict[Variant, _ClientState] = {}
    with sock:
        while True:
            try:
                request, _ = _receive_message(sock)
            except (ConnectionError, OSError):
                return
            if request is None:
                return
            try:
                variant = request["variant"]
                if variant not in states:
                    states[variant] = _ClientState(parts, variant)
                reply: Any = _train(parts, states[variant], request)
            except Exception:  # noqa: BLE001 - reported to the parent
                reply = {"error": traceback.format_exc()}
            _send_message(sock, reply)


def _context() -> mp.context.BaseContext:
    # Client processes fork from a server process that imported torch once: they start in a
    # fraction of a second, without this process's threads (gRPC's among them).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "simulation.benchmark.network"])
    return ctx


# -- rounds over the emulated network -------------------------------------------------------------


@dataclass(frozen=True)
class LinkProfile:
    """A client's link: round-trip time and rate (each direction)."""

    rtt: float
    """Seconds."""
    rate: float | None
    """Bits per second; ``None`` is unlimited."""

    @property
    def label(self) -> str:
        rate = "unlimited" if self.rate is None else f"{self.rate / 1e6:g} Mbit/s"
        return f"{1e3 * self.rtt:g} ms, {rate}"


NETWORK_PROFILES = (
    LinkProfile(0.0, 100e6),
    LinkProfile(0.020, 100e6),
    LinkProfile(0.050, 100e6),
    LinkProfile(0.100, 100e6),
    LinkProfile(0.050, 10e6),
)


@dataclass
class RoundFigures:
    """One round: its wall time and the bytes it moved (all clients, both directions)."""

    seconds: float
    data_plane_bytes: int
    sync_bytes: int
    link_bytes: int
    """Everything that crossed the clients' links: data plane, model sync and their framing
    (gRPC, HTTP/2, TCP payload; not TCP/IP headers)."""
    examples: int


class _ServerSide:
    """One variant on the server: its split server (or none, for FedAvg), its global weights,
    and a relay per client to the split server over the client's link."""

    def __init__(
        self, parts: _Parts, variant: Variant, network: EmulatedNetwork, links: Sequence[int]
    ) -> None:
        self.variant = variant
        self.server: SplitServer | None = None
        self.relays: list[str] = []
        if not variant.split:
            self.state = parts.model().state_dict()
            return
        split = parts.split(variant)
        self.state = split.client_state_dict()
        local_loss = variant.name == "local-loss"
        trainer = make_trainer(
            variant.name,
            server_copies="shared" if local_loss else None,
            server_half=copy.deepcopy(split.server_half),
            optimizer=parts.server_optimizer,
        )
        self.server = SplitServer(
            trainer=trainer,
            activation_shape=split.activation_shape,
            activation_dtype=split.activation_dtype,
            insecure=True,  # loopback only
            local_loss=local_loss,
        )
        self.server.start()
        self.relays = [
            network.add_relay(target=str(self.server.address), link=link) for link in links
        ]

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)


class LinkRun:
    """Rounds of a task over emulated links: the split servers and the model-sync server in this
    process, a process per client, a :class:`Link` per client that all of a client's connections
    cross. Variants and link profiles can be interleaved; each variant keeps its own weights,
    server half and client optimizers from round to round.

    Parameters
    ----------
    task : Task
        What to train.
    profile : LinkProfile
        The clients' links to begin with (:meth:`set_profile` changes them).
    server_threads : int (default: 1)
        Torch threads of this process (the server halves); the clients have one each.
    """

    def __init__(self, *, task: Task, profile: LinkProfile, server_threads: int = 1) -> None:
        self.task = task
        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(server_threads)
        self.parts = _Parts(task, client=None)
        self.profile = profile
        self._sides: dict[Variant, _ServerSide] = {}
        self._rounds: dict[Variant, int] = {}
        self._processes: list[Any] = []
        self._sync: list[socket.socket | None] = [None] * task.num_clients
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=task.num_clients)
        self.network = EmulatedNetwork()
        try:
            self.links = [
                self.network.add_link(delay=profile.rtt / 2, rate=profile.rate)
                for _ in range(task.num_clients)
            ]
            target = f"127.0.0.1:{self._listener.getsockname()[1]}"
            ctx = _context()
            pipes = []
            for client, link in enumerate(self.links):
                parent, child = ctx.Pipe()
                address = self.network.add_relay(target=target, link=link)
                process = ctx.Process(
                    target=_client_process, args=(child, task, client, address), daemon=True
                )
                process.start()
                pipes.append(parent)
                self._processes.append(process)
            # A client says it is ready once its connection is in this listener's backlog.
            for client, pipe in enumerate(pipes):
                answer = pipe.recv() if pipe.poll(600) else "no answer in 600 s"
                if answer != "ready":
                    raise RuntimeError(f"client {client} could not start:\n{answer}")
            self._listener.settimeout(60)
            for _ in range(task.num_clients):
                sock, _ = self._listener.accept()
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client, _ = _receive_message(sock)
                self._sync[client] = sock
        except BaseException:
            self.close()
            raise

    def set_profile(self, profile: LinkProfile) -> None:
        """Give every client's link this round-trip time and rate."""
        for link in self.links:
            self.network.set_link(link, delay=profile.rtt / 2, rate=profile.rate)
        self.profile = profile

    def round(self, variant: Variant) -> RoundFigures:
        """One round of ``variant``: the model sync down, local training (through the split
        server for the split variants), the updates up, and the merge."""
        side = self._sides.get(variant)
        if side is None:
            side = self._sides[variant] = _ServerSide(self.parts, variant, self.network, self.links)
        server_round = self._rounds[variant] = self._rounds.get(variant, 0) + 1
        for link in self.links:
            self.network.reset_counters(link)
        nodes = list(range(1, self.task.num_clients + 1))
        started = time.perf_counter()
        tokens = side.server.open_round(server_round, nodes) if side.server else {}
        sync_bytes = 0
        for client, node in enumerate(nodes):
            request = {
                "variant": variant,
                "round": server_round,
                "node": node,
                "token": tokens.get(node),
                "address": side.relays[client] if side.relays else None,
                "state": side.state,
            }
            sync_bytes += _send_message(self._connection(client), request)
        replies = []
        for client in range(self.task.num_clients):
            reply, size = _receive_message(self._connection(client))
            sync_bytes += size
            if "error" in reply:
                raise RuntimeError(f"client {client} failed in {variant.label}:\n{reply['error']}")
            replies.append(reply)
        data_plane = side.server.close_round().data_plane_bytes if side.server else 0
        weights = [reply["examples"] for reply in replies]
        side.state = weighted_average([reply["state"] for reply in replies], weights)
        if side.server is not None:
            trainer = side.server.trainer
            copies = trainer.client_copies(nodes)
            if copies:
                trainer.load_merged(
                    weighted_average([copies[n].state_dict() for n in nodes], weights)
                )
        seconds = time.perf_counter() - started
        return RoundFigures(
            seconds=seconds,
            data_plane_bytes=data_plane,
            sync_bytes=sync_bytes,
            link_bytes=sum(self.network.link_bytes(link) for link in self.links),
            examples=sum(weights),
        )

    def global_model(self, variant: Variant) -> nn.Module:
        """The variant's whole model now: the merged client side and the server half."""
        side = self._sides[variant]
        if not variant.split:
            model = self.parts.model()
            model.load_state_dict(side.state)
            return model
        split = self.parts.split(variant)
        split.load_client_state_dict(side.state)
        assert side.server is not None
        split.server_half.load_state_dict(side.server.trainer.server_half.state_dict())
        return split.full_model()

    def _connection(self, client: int) -> socket.socket:
        sock = self._sync[client]
        assert sock is not None
        return sock

    def close(self) -> None:
        for sock in self._sync:
            if sock is not None:
                with contextlib.suppress(OSError):
                    _send_message(sock, None)
                sock.close()
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        for side in self._sides.values():
            side.close()
        self.network.close()
        self._listener.close()
        torch.set_num_threads(self._previous_threads)

    def __enter__(self) -> LinkRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def measure_network(
    task: Task,
    *,
    variants: Sequence[Variant],
    profiles: Sequence[LinkProfile],
    repeats: int,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[tuple[Variant, LinkProfile], list[RoundFigures]]:
    """Steady rounds of every variant over every profile, ``repeats`` of each.

    One warm-up round per variant (connections, caches, the allocator) is left out; then each
    repeat runs every profile and every variant in turn, so that a busy spell slows them all.
    """
    rounds: dict[tuple[Variant, LinkProfile], list[RoundFigures]] = {
        (v, p): [] for v in variants for p in profiles
    }
    with LinkRun(task=task, profile=profiles[0]) as run:
        for variant in variants:
            run.round(variant)
        for repeat in range(repeats):
            for profile in profiles:
                run.set_profile(profile)
                for variant in variants:
                    rounds[variant, profile].append(run.round(variant))
            progress(f"  {task.describe()}: repeat {repeat + 1} of {repeats} done")
    return rounds


def _seconds(figures: list[RoundFigures]) -> Repeated:
    series = Repeated()
    for figure in figures:
        series.values.append(figure.seconds)
    return series


# -- what the relay itself adds ----------------------------------------------------------------


def _w1_frames(workload: str) -> tuple[bytes, bytes]:
    """A real data-plane exchange of ``workload``: a FORWARD frame (a batch of activations and
    labels) and the BACKWARD frame that answers it (the gradient at the cut, the loss)."""
    work = WORKLOADS[workload]
    split = work.split()
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(work.batch_size, *split.activation_shape, generator=generator)
    labels = torch.randint(0, 10, (work.batch_size,), generator=generator)
    up = Frame(FrameKind.FORWARD, 1, tensors={"activations": activations, "labels": labels})
    down = Frame(
        FrameKind.BACKWARD,
        1,
        tensors={"gradient": activations},
        scalars={"loss": 2.3, "correct": 3},
    )
    return encode_frame(up), encode_frame(down)


def _echo_client(conn: Connection, workload: str) -> None:
    """Times exchanges on one gRPC stream, as asked (an address and a count), until ``None``."""
    request, _ = _w1_frames(workload)
    while (ask := conn.recv()) is not None:
        address, count = ask
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        replies = channel.stream_stream(STREAM_METHOD)(iter(outbox.get, None))
        times = []
        for _ in range(count):
            started = time.perf_counter()
            outbox.put(request)
            next(replies)
            times.append(time.perf_counter() - started)
        outbox.put(None)
        channel.close()
        conn.send(times)


PACED_RATE = 100e9
"""The rate of the overhead measurement's paced path: fast enough that the transmission time
it adds (0.024 ms for a W1 exchange) is small and known, slow enough to take the path every
rate-limited link takes (a writer thread that sends each chunk when it is due)."""


@dataclass
class RelayOverhead:
    """Seconds per data-plane exchange (a W1 batch up, its gradient down, as real frames over
    a real gRPC stream to a server that answers at once): dialled directly, through a relay at
    zero delay and unlimited rate, and through one at zero delay paced at :data:`PACED_RATE`.
    Each figure is the median exchange of a block; the blocks of the three paths interleave."""

    direct: Repeated
    relayed: Repeated
    paced: Repeated
    transmission: float
    """Seconds the paced path's rate accounts for, both ways."""

    @property
    def added(self) -> float:
        """Seconds the relay adds to a round trip: the difference of the minimums."""
        return self.relayed.min - self.direct.min

    @property
    def paced_added(self) -> float:
        """Seconds the paced relay adds beyond what its rate accounts for."""
        return self.paced.min - self.transmission - self.direct.min

    @property
    def noisy(self) -> bool:
        return self.direct.noisy or self.relayed.noisy or self.paced.noisy


def measure_relay_overhead(*, exchanges: int, repeats: int, workload: str = "W1") -> RelayOverhead:
    """What the relay adds to a data-plane round trip at zero delay (see :class:`RelayOverhead`).

    The server answers every frame with a pre-encoded reply, so that the figure is the
    transport's and the relay's, not the server half's compute. The client runs in a process of
    its own, the relays in the :class:`EmulatedNetwork`'s and the server in this one, as in
    :class:`LinkRun`.
    """
    request, reply = _w1_frames(workload)

    def answer(requests: Iterable[bytes], context: grpc.ServicerContext) -> Iterable[bytes]:
        for _ in requests:
            yield reply

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Train": grpc.stream_stream_rpc_method_handler(answer)}
            ),
        )
    )
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    network = EmulatedNetwork()
    relayed_at = network.add_relay(target=address, link=network.add_link())
    paced_at = network.add_relay(target=address, link=network.add_link(rate=PACED_RATE))
    ctx = _context()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_echo_client, args=(child, workload), daemon=True)
    process.start()
    paths = {address: Repeated(), relayed_at: Repeated(), paced_at: Repeated()}

    def block(target: str) -> float:
        parent.send((target, exchanges))
        return statistics.median(parent.recv()[5:])  # the first exchanges set the stream up

    try:
        for target in paths:  # warm-up: connections, allocators, caches
            block(target)
        for _ in range(repeats):
            for target, series in paths.items():
                series.add(block(target))
    finally:
        parent.send(None)
        process.join(timeout=10)
        network.close()
        server.stop(grace=None)
    direct, relayed, paced = paths.values()
    transmission = (len(request) + len(reply)) * 8 / PACED_RATE
    return RelayOverhead(direct=direct, relayed=relayed, paced=paced, transmission=transmission)


def relay_rate_check(*, nbytes: int, rate: float) -> float:
    """Seconds to move ``nbytes`` one way through a relay at ``rate`` bits/s (no delay): a
    sender and a receiver on loopback, the time taken at the receiver."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        with Relay(target=target, rate=rate, handshake=False) as relay:
            sender = socket.create_connection(_host_port(str(relay.address)))
            receiver, _ = listener.accept()
            with sender, receiver:
                started = time.perf_counter()
                threading.Thread(target=sender.sendall, args=(bytes(nbytes),), daemon=True).start()
                _receive_exactly(receiver, nbytes)
                return time.perf_counter() - started


# -- the section -------------------------------------------------------------------------------

QUICK_PROFILES = (LinkProfile(0.0, 100e6), LinkProfile(0.050, 100e6))

NETWORK_SCALE = {"W1": (4, 640), "W2": (2, 256)}
"""Clients and samples per client of each workload in the section: W1 20 batches a client, W2
4 (W2's batch of 64 moves 4 MiB each way: 0.34 s at 100 Mbit/s, 3.4 s at 10 Mbit/s)."""
QUICK_SCALE = {"W1": (2, 256), "W2": (2, 256)}

GOAL_RTT_RATIO = 1.2
"""Goal: a local-loss round at 50 ms RTT takes at most this times its round at 0 ms."""
GOAL_BYTES = {1: 1 / 2, 4: 1 / 8}
"""Goal: local-loss data-plane bytes at most this share of SFLV1's, by ``send_every``."""


def _megabytes(figures: list[RoundFigures], attribute: str) -> float:
    return statistics.median(getattr(f, attribute) for f in figures) / 1e6


def run_network(
    report: Any,
    *,
    quick: bool,
    repeats: int,
    workloads: Sequence[str],
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``network`` section: relay checks, then round time and bytes of every variant over
    every link profile, for each workload; writes ``network.md`` and ``network.json`` to
    ``out_dir``. Returns the figures (also in ``report.figures["network"]``)."""
    first_line = len(report.lines)
    shaping = kernel_shaping()
    report.say(f"\nNetwork emulation: {shaping.describe()}.")
    figures: dict[str, Any] = {"kernel_shaping": shaping.__dict__, "workloads": {}}

    overhead = measure_relay_overhead(
        exchanges=100 if quick else 1000, repeats=repeats if quick else max(repeats, 7)
    )
    added_ms, paced_ms = 1e3 * overhead.added, 1e3 * overhead.paced_added
    figures["relay_overhead"] = {
        "direct": overhead.direct.as_dict(),
        "relayed": overhead.relayed.as_dict(),
        "paced": overhead.paced.as_dict(),
        "paced_rate": PACED_RATE,
        "transmission_seconds": overhead.transmission,
        "added_seconds": overhead.added,
        "paced_added_seconds": overhead.paced_added,
    }
    nbytes, rate = 1_250_000, 10e6
    rate_seconds = relay_rate_check(nbytes=nbytes, rate=rate)
    figures["relay_rate"] = {"bytes": nbytes, "rate": rate, "seconds": rate_seconds}
    noisy = " noisy" if overhead.noisy else ""
    report.table(
        "The relay itself, at zero delay: a W1 exchange over gRPC (150 KB up, 150 KB down, "
        "answered at once), ms, min (median, spread) of block medians, direct, through a relay "
        f"and through one paced at {PACED_RATE / 1e9:g} Gbit/s (whose rate accounts for "
        f"{1e3 * overhead.transmission:.3f} ms); and a 1.25 MB transfer at 10 Mbit/s (1.000 s "
        "by the rate)",
        [
            "direct",
            "relay",
            "paced relay",
            "relay adds",
            "paced relay adds",
            "goal: under 0.2 ms",
            "1.25 MB at 10 Mbit/s",
        ],
        [
            [
                overhead.direct.show(1e3, 3),
                overhead.relayed.show(1e3, 3),
                overhead.paced.show(1e3, 3),
                f"**{added_ms:.3f}**{noisy}",
                f"**{paced_ms:.3f}**{noisy}",
                "met" if max(added_ms, paced_ms) < 0.2 else "NOT met",
                f"{rate_seconds:.3f} s",
            ]
        ],
    )

    profiles = QUICK_PROFILES if quick else NETWORK_PROFILES
    reference = next(p for p in profiles if p.rtt == 0.050 and p.rate == 100e6)
    zero = next(p for p in profiles if p.rtt == 0.0)
    goals: list[str] = []
    for name in workloads:
        clients, samples = (QUICK_SCALE if quick else NETWORK_SCALE)[name]
        workload = WORKLOADS[name]
        task = Task(num_clients=clients, workload=name, samples=samples)
        count = repeats if name == "W1" or quick else min(repeats, 3)
        rounds = measure_network(
            task, variants=VARIANTS, profiles=profiles, repeats=count, progress=report.out
        )
        times = {key: _seconds(values) for key, values in rounds.items()}
        figures["workloads"][name] = {
            "clients": clients,
            "samples": samples,
            "batch_size": workload.batch_size,
            "rounds": {
                f"{v.label} @ {p.label}": {
                    "seconds": times[v, p].as_dict(),
                    "data_plane_bytes": [f.data_plane_bytes for f in values],
                    "sync_bytes": [f.sync_bytes for f in values],
                    "link_bytes": [f.link_bytes for f in values],
                }
                for (v, p), values in rounds.items()
            },
        }
        batches_per_client = -(-samples // workload.batch_size)
        report.table(
            f"Round time over the network, {name} ({workload.description}, batch "
            f"{workload.batch_size}), {clients} clients x {samples} samples ({batches_per_client} "
            f"batches each), a link per client; seconds per steady round, min (median, spread) "
            f"of {count}",
            ["variant", *(p.label for p in profiles), f"{reference.label} / {zero.label}"],
            [
                [
                    v.label,
                    *(times[v, p].show(digits=3) for p in profiles),
                    f"**{ratio(times[v, reference], times[v, zero]).show()}**",
                ]
                for v in VARIANTS
            ],
        )
        v1 = _megabytes(rounds[VARIANTS[0], reference], "data_plane_bytes")
        report.table(
            f"Bytes per round, {name}, all clients, both directions (at {reference.label})",
            [
                "variant",
                "data plane MB",
                "data plane / SFLV1's",
                "model sync MB",
                "on the links MB",
            ],
            [
                [
                    v.label,
                    f"{_megabytes(rounds[v, reference], 'data_plane_bytes'):.3f}",
                    f"{_megabytes(rounds[v, reference], 'data_plane_bytes') / v1:.4f}",
                    f"{_megabytes(rounds[v, reference], 'sync_bytes'):.3f}",
                    f"{_megabytes(rounds[v, reference], 'link_bytes'):.3f}",
                ]
                for v in VARIANTS
            ],
        )
        for k, share in GOAL_BYTES.items():
            variant = Variant("local-loss", k)
            got = _megabytes(rounds[variant, reference], "data_plane_bytes") / v1
            goals.append(
                f"{name}: local-loss k={k} data-plane bytes {got:.4f} of SFLV1's (goal at most "
                f"{share:.4f}): {'met' if got <= share else 'NOT met'}"
                + (
                    f", by {100 * (got / share - 1):.2f}%: each batch sends its labels and "
                    "frame header up and gets an acknowledgement down"
                    if got > share
                    else ""
                )
            )
        slowdown = ratio(times[VARIANTS[2], reference], times[VARIANTS[2], zero])
        goals.append(
            f"{name}: local-loss k=1 round at {reference.label} is {slowdown.show()} x its round "
            f"at {zero.label} (goal at most {GOAL_RTT_RATIO}): "
            f"{'met' if slowdown.value <= GOAL_RTT_RATIO else 'NOT met'}"
        )
    report.say("\nGoals:\n")
    for line in goals:
        report.say(f"- {line}")
    figures["goals"] = goals
    report.figures["network"] = figures
    if out_dir is not None:
        _write(out_dir, "network", report, first_line, figures)
    return figures


def _write(out_dir: Path, name: str, report: Any, first_line: int, figures: Any) -> None:
    """``<name>.md`` (the run's header and this section's lines) and ``<name>.json``."""
    import json  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    header = [line for line in report.lines[:first_line] if line.startswith(("Machine", "Comm"))]
    lines = [*header, *report.lines[first_line:], "", f"Machine at the end: {machine()}"]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str))
    report.out(f"\nWrote {out_dir / f'{name}.md'} and {out_dir / f'{name}.json'}")
