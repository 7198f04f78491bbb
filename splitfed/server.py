"""The split server: a gRPC service that runs the server half for every batch.

Each selected client opens one bidirectional stream per round and sends FORWARD frames
(step, activations, labels); for each it gets back a BACKWARD frame (the gradient at the cut, the
loss) or an ERROR frame that says why the batch was refused. A bad batch is answered on its own
stream only; every other client keeps being served. In an evaluation round, EVALUATE frames are
answered with the batch's loss (EVALUATION) and nothing is trained. A split server for local-loss
training takes ACTIVATIONS frames (activations, labels) instead, trains its half on each without
computing the gradient at the cut, and answers with an ACK that holds the loss and no tensor; the
client does not wait for it before its next batch.

Streams authenticate with a token derived from a per-run secret, the round, the mode and the node
id (HMAC-SHA256, :func:`splitfed.protocol.round_token`); it reaches the client inside Flower's
message, and only nodes selected for the current round hold a valid one, for one stream.

A request is checked before it costs anything: a frame is refused from its header when its kind,
tensors, dtypes, shapes or batch size are not what the server half accepts (gRPC refuses frames
larger than the largest acceptable batch before they arrive), and a batch is refused before any
optimizer step when its loss or gradients are not finite (see :mod:`splitfed.server_half`). A
refused request changes nothing. Limits are explicit: ``max_streams`` streams at once (more are
answered ``RESOURCE_EXHAUSTED`` and clients ask again), ``max_batch_size`` examples a batch, a
stream idle for ``idle_timeout`` seconds is closed, and a label-private batch waits at most
``hold_timeout`` seconds for its output gradient. Each limit is logged when hit and counted.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import torch

from .protocol import (
    BUSY,
    METADATA_MODE,
    METADATA_NODE,
    METADATA_ROUND,
    METADATA_TOKEN,
    SERVICE,
    Mode,
    round_token,
)
from .server_half import RefusedBatch, ServerHalfTrainer, StepResult
from .tls import TLSCredentials

if TYPE_CHECKING:
    from .cut import SplitModel
from .wire import (
    Frame,
    FrameKind,
    FrameLimits,
    TensorSpec,
    WireFormatError,
    decode_frame,
    encode_frame,
    max_frame_bytes,
)

__all__ = ["BatchError", "RoundStats", "SplitServer"]

logger = logging.getLogger("flwr_splitfed")
_T = TypeVar("_T")

_HEADROOM = 16
"""Handler threads beyond ``max_streams``: they answer streams over the limit at once."""
_WATCH_INTERVAL = 0.25
"""Seconds between the watchdog's looks for idle streams and stale label-private batches."""
_LOGGED_REFUSALS = 20
"""Refusals logged per round; the rest are counted and summed up when the round closes."""
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BatchError(ValueError):
    """A batch does not match what the server half expects."""


@dataclass
class RoundStats:
    """What crossed the data plane in one round, and what was refused."""

    server_round: int
    mode: str = Mode.TRAIN
    bytes_received: int = 0
    bytes_sent: int = 0
    batches: int = 0
    refused_batches: int = 0
    refused_streams: int = 0
    busy_refusals: int = 0
    """Streams answered ``RESOURCE_EXHAUSTED`` because ``max_streams`` were open (clients ask
    again)."""
    idle_streams_closed: int = 0
    released_holds: int = 0
    """Label-private batches dropped because their output gradient did not come in time."""
    examples_by_node: dict[int, int] = field(default_factory=dict)

    @property
    def data_plane_bytes(self) -> int:
        """Bytes in both directions."""
        return self.bytes_received + self.bytes_sent


@dataclass
class _Stream:
    context: grpc.ServicerContext
    last_frame: float


class SplitServer:
    """Serves the server half to clients over gRPC, one stream per client per round.

    Parameters
    ----------
    trainer : ServerHalfTrainer
        Applies the variant's update rule to each batch.
    activation_shape : tuple[int, ...]
        Shape of one example's cut-layer activations; other shapes are refused.
    activation_dtype : torch.dtype (default: torch.float32)
        Dtype of the activations; other dtypes are refused.
    address : str (default: "127.0.0.1:0")
        Where to listen, ``host:port``; port 0 picks a free one.
    advertised_address : str | None (default: None)
        The address clients dial. ``None`` means the bound address; when binding to all
        interfaces (``0.0.0.0``), this host's name is advertised: set it when clients reach the
        server through another name or address.
    max_streams : int (default: 64)
        Most streams served at once. A stream over the limit is answered ``RESOURCE_EXHAUSTED``
        at once, and the client asks again with backoff until one is free; each such answer is
        counted (``RoundStats.busy_refusals``) and logged.
    max_batch_size : int (default: 4096)
        Most examples in one batch. With the activation shape it bounds the largest frame the
        server accepts, and so the memory one frame can cost; larger frames are refused from
        their size or header, before they are read.
    labels : TensorSpec | None (default: None)
        What one example's labels are. ``None`` means one int64 class index per example, as
        ``nn.CrossEntropyLoss`` takes them; give e.g. ``TensorSpec(frozenset({torch.float32}),
        (3,))`` for a loss that takes three floats per example.
    output_shape : tuple[int, ...] | None (default: None)
        The label-private split: one example of the server half's output (the shape of the
        output gradients clients send back). Required with ``label_private``.
    idle_timeout : float (default: 120.0)
        Seconds a stream may go without sending a frame before the server closes it and frees
        its slot. A client's forward and backward pass of one batch must fit in it.
    hold_timeout : float (default: 60.0)
        The label-private split: seconds a batch waits for its output gradient. SFLV2 holds its
        one server half for that time; past it the batch is dropped (as if never sent) and the
        half is free for the other clients.
    tls : TLSCredentials | None (default: None)
        Serve TLS with this certificate. Required unless ``insecure=True``.
    insecure : bool (default: False)
        Serve plaintext: activations, labels and gradients cross the network unencrypted.
        Only for a single machine or a private network; it logs a warning.
    label_private : bool (default: False)
        Serve the label-private (U-shaped) split: clients send activations without labels
        (``SMASHED``), get the server half's output back (``SERVER_OUTPUT``), send the gradient
        of their loss at it (``OUTPUT_GRADIENT``) and get the gradient at the cut
        (``BACKWARD``). The server half then ends where the client head begins.
    local_loss : bool (default: False)
        Serve local-loss training: clients send ``ACTIVATIONS`` frames (activations, labels)
        without waiting, the server half trains on each without computing the gradient at the
        cut, and each is answered by an ``ACK`` (its loss, no tensor). Not with
        ``label_private``.
    intra_op_threads : int | None (default: None)
        Torch threads per operation (``torch.set_num_threads``, which applies to the whole
        process) set when the server starts. ``None`` leaves torch's setting. On a CPU shared by
        several concurrent clients (SFLV1), 1 lets each client's stream use one core instead of
        every stream fighting over all of them.
    """

    def __init__(
        self,
        *,
        trainer: ServerHalfTrainer,
        activation_shape: tuple[int, ...],
        activation_dtype: torch.dtype = torch.float32,
        address: str = "127.0.0.1:0",
        advertised_address: str | None = None,
        max_streams: int = 64,
        max_batch_size: int = 4096,
        labels: TensorSpec | None = None,
        output_shape: tuple[int, ...] | None = None,
        idle_timeout: float = 120.0,
        hold_timeout: float = 60.0,
        tls: TLSCredentials | None = None,
        insecure: bool = False,
        label_private: bool = False,
        local_loss: bool = False,
        intra_op_threads: int | None = None,
    ) -> None:
        problems = []
        if label_private and local_loss:
            problems.append(
                "local-loss training sends labels to the split server, so it cannot serve the "
                "label-private split; pass one of label_private and local_loss"
            )
        if intra_op_threads is not None and intra_op_threads < 1:
            problems.append(
                f"intra_op_threads must be at least 1, or None to leave torch's setting; got "
                f"{intra_op_threads}"
            )
        if max_streams < 1 or max_batch_size < 1:
            problems.append(
                f"max_streams and max_batch_size must be at least 1; got {max_streams} and "
                f"{max_batch_size}"
            )
        if not idle_timeout > 0 or not hold_timeout > 0:
            problems.append(
                f"idle_timeout and hold_timeout must be positive (seconds); got {idle_timeout} "
                f"and {hold_timeout}"
            )
        if label_private and output_shape is None:
            problems.append(
                "the label-private split needs output_shape, the shape of one example of the "
                "server half's output (SplitModel.output_shape)"
            )
        if tls is None and not insecure:
            problems.append(
                "the split server needs TLS credentials: pass tls=TLSCredentials.from_files("
                "certfile=..., keyfile=..., ca_certfile=...), or insecure=True to serve "
                "plaintext on a single machine or a private network"
            )
        if tls is not None and insecure:
            problems.append("pass either tls=... or insecure=True, not both")
        if problems:
            raise ValueError("; ".join(problems))
        self.tls = tls
        self.trainer = trainer
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.bind_address = address
        self._advertised = advertised_address or None
        self.max_streams = max_streams
        self.max_batch_size = max_batch_size
        self.idle_timeout = idle_timeout
        self.hold_timeout = hold_timeout
        self.label_private = label_private
        self.local_loss = local_loss
        self.intra_op_threads = intra_op_threads
        self.limits = self._frame_limits(labels, output_shape)
        kind = (
            "the label-private split"
            if label_private
            else "local-loss training (activations frames, acknowledged without a gradient)"
            if local_loss
            else "the plain split"
        )
        shape = "x".join(map(str, self.activation_shape))
        self._expects = (
            f"This split server runs {kind} on activations of {shape} "
            f"{str(activation_dtype).removeprefix('torch.')} per example, at most "
            f"{max_batch_size} a batch: the client must cut the same model at the same place and "
            "send what its client half outputs"
        )
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._steps_done = threading.Condition(self._lock)
        self._round = 0
        self._mode = Mode.TRAIN
        self._selected: frozenset[int] = frozenset()
        self._used: set[int] = set()  # nodes that opened their stream of this round
        self._stats = RoundStats(server_round=0)
        self._streams: dict[int, _Stream] = {}  # open streams of this round
        self._steps_in_flight = 0
        self._logged = 0
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.address: str | None = None

    def _frame_limits(
        self, labels: TensorSpec | None, output_shape: tuple[int, ...] | None
    ) -> dict[str, FrameLimits]:
        """What each kind of stream accepts, checked from a frame's header."""
        activations = TensorSpec(frozenset({self.activation_dtype}), self.activation_shape)
        labels = labels or TensorSpec(frozenset({torch.int64}), ())
        batch = {"activations": activations, "labels": labels}
        if self.label_private:
            assert output_shape is not None
            gradient = TensorSpec(_FLOAT_DTYPES, tuple(output_shape))
            kinds = {
                Mode.TRAIN: {
                    FrameKind.SMASHED: {"activations": activations},
                    FrameKind.OUTPUT_GRADIENT: {"gradient": gradient},
                },
                Mode.EVALUATE: {FrameKind.SMASHED: {"activations": activations}},
            }
        else:
            training = FrameKind.ACTIVATIONS if self.local_loss else FrameKind.FORWARD
            kinds = {
                Mode.TRAIN: {training: batch},
                Mode.EVALUATE: {FrameKind.EVALUATE: batch},
            }
        return {
            mode: FrameLimits(kinds=accepted, max_batch=self.max_batch_size)
            for mode, accepted in kinds.items()
        }

    @classmethod
    def for_split(
        cls, split: SplitModel, *, trainer: ServerHalfTrainer, **options: Any
    ) -> SplitServer:
        """A split server for ``split``: the activations' shape and dtype, and in the
        label-private split the server half's output shape, are the split's; ``options`` are
        the other keyword arguments of :class:`SplitServer`."""
        return cls(
            trainer=trainer,
            activation_shape=split.activation_shape,
            activation_dtype=split.activation_dtype,
            output_shape=split.output_shape,
            label_private=split.label_private,
            **options,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving; return the address clients should dial."""
        if self._server is not None:
            raise RuntimeError("the split server is already running; call stop() first")
        if self.intra_op_threads is not None:
            torch.set_num_threads(self.intra_op_threads)
        largest = max(max_frame_bytes(limits) for limits in self.limits.values())
        threads = self.max_streams + _HEADROOM
        server = grpc.server(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="split-server"),
            options=[
                # A frame larger than the largest acceptable batch is refused before it arrives.
                ("grpc.max_receive_message_length", largest),
                ("grpc.max_send_message_length", -1),
            ],
            maximum_concurrent_rpcs=threads,
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Train": grpc.stream_stream_rpc_method_handler(self._serve_stream)}
        )
        server.add_generic_rpc_handlers((handler,))
        host = self.bind_address.rsplit(":", 1)[0]
        try:
            if self.tls is None:
                port = server.add_insecure_port(self.bind_address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.private_key, self.tls.certificate_chain)]
                )
                port = server.add_secure_port(self.bind_address, credentials)
        except RuntimeError as err:
            raise OSError(
                f"the split server cannot listen on {self.bind_address!r}: {err}. "
                "Choose a free port, or port 0 for any free one"
            ) from err
        server.start()
        self._server = server
        self._stopping.clear()
        self._watchdog = threading.Thread(
            target=self._watch, name="split-server-watchdog", daemon=True
        )
        self._watchdog.start()
        bound = f"{host}:{port}"
        if self._advertised:
            self.address = self._advertised
        elif host in ("0.0.0.0", "[::]", ""):
            self.address = f"{socket.gethostname()}:{port}"
        else:
            self.address = bound
        logger.info(
            "Split server listening on %s with %s (clients dial %s); limits: %d streams at "
            "once, %d examples and %.1f MB a frame, %.0f s idle",
            bound,
            "TLS" if self.tls else "no TLS",
            self.address,
            self.max_streams,
            self.max_batch_size,
            largest / 1e6,
            self.idle_timeout,
        )
        if self.tls is None:
            reach = (
                "this machine only"
                if host in ("127.0.0.1", "localhost", "[::1]")
                else "the network, UNENCRYPTED"
            )
            logger.warning(
                "INSECURE: the split server on %s serves plaintext to %s: activations, labels "
                "and gradients are readable by anyone on the path. Give it TLS credentials "
                "(tls=TLSCredentials.from_files(certfile=..., keyfile=..., ca_certfile=...)) for "
                "anything but a single machine or a private network",
                bound,
                reach,
            )
        return self.address

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving and release the trainer's threads."""
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self.trainer.close()

    def __enter__(self) -> SplitServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- rounds ---------------------------------------------------------------------------------

    def open_round(
        self, server_round: int, node_ids: list[int], *, mode: str = Mode.TRAIN
    ) -> dict[int, str]:
        """Admit ``node_ids`` for ``server_round``; return each node's credential.

        With ``mode="evaluate"`` the streams of the round evaluate: the server half runs in eval
        mode, without gradients, and nothing is trained.
        """
        if mode not in Mode.ALL:
            raise ValueError(f"mode must be one of {', '.join(Mode.ALL)}; got {mode!r}")
        with self._lock:
            self._round, self._mode = server_round, mode
            self._selected = frozenset(node_ids)
            self._used = set()
            self._stats = RoundStats(server_round=server_round, mode=mode)
            self._logged = 0
        if mode == Mode.TRAIN:
            self.trainer.begin_round(list(node_ids))
        else:
            self.trainer.begin_evaluation()
        return {
            node_id: round_token(self._secret, server_round, node_id, mode) for node_id in node_ids
        }

    def close_round(self) -> RoundStats:
        """End the current round and return its statistics.

        Streams still open (a client that stalled, or whose reply Flower stopped waiting for)
        are cut, and steps already running finish first: once this returns, no batch of the
        round can change the server half.
        """
        with self._lock:
            self._selected = frozenset()
            open_streams = dict(self._streams)
            self._streams.clear()
            for node_id, stream in open_streams.items():
                logger.warning(
                    "Split server cut the stream of node %s: round %s ended before the client "
                    "finished (it stalled, failed, or its reply came too late)",
                    node_id,
                    self._round,
                )
                stream.context.cancel()
            self._steps_done.wait_for(lambda: self._steps_in_flight == 0)
            stats, mode, unlogged = self._stats, self._mode, self._logged - _LOGGED_REFUSALS
        if unlogged > 0:
            logger.warning(
                "Split server: %d more refusals in round %d were not logged one by one (the "
                "round's metrics count them all)",
                unlogged,
                stats.server_round,
            )
        if mode == Mode.TRAIN:
            self.trainer.abandon_stale(0.0)  # a batch left waiting for its output gradient
            stats.examples_by_node = dict(self.trainer.examples_by_node)
        else:
            self.trainer.end_evaluation()
        return stats

    # -- the stream -----------------------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> int:
        """Check the stream's credential; take a stream slot; return the node id."""
        metadata = dict(context.invocation_metadata())
        try:
            node_id = int(metadata[METADATA_NODE])
            server_round = int(metadata[METADATA_ROUND])
            mode = str(metadata.get(METADATA_MODE, Mode.TRAIN))
            token = str(metadata[METADATA_TOKEN])
        except (KeyError, ValueError, TypeError):
            self._refuse(context, "?", "the stream carries no valid credential metadata")
        with self._lock:
            current_round, current_mode, selected = self._round, self._mode, self._selected
        expected = round_token(self._secret, server_round, node_id, mode)
        # Compared as bytes: a token of any characters is refused, never an exception.
        if not hmac.compare_digest(expected.encode(), token.encode("utf-8", "surrogateescape")):
            self._refuse(context, node_id, "the credential is not valid for this run")
        if server_round != current_round or mode != current_mode or node_id not in selected:
            self._refuse(
                context,
                node_id,
                f"node is not selected for the {mode} of round {server_round} (now: the "
                f"{current_mode} of round {current_round})",
            )
        with self._lock:
            used = node_id in self._used
            busy = not used and len(self._streams) >= self.max_streams
            if not used and not busy:
                self._used.add(node_id)
                self._streams[node_id] = _Stream(context, time.monotonic())
            elif busy:
                self._stats.busy_refusals += 1
        if used:
            self._refuse(context, node_id, "the node already opened its stream of this round")
        if busy:
            self._log(
                "Split server is at its limit of %d streams at once; node %s asks again",
                self.max_streams,
                node_id,
            )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{BUSY}: it serves {self.max_streams} streams at once; ask again shortly",
            )
        return node_id

    def _refuse(self, context: grpc.ServicerContext, node_id: object, reason: str) -> NoReturn:
        with self._lock:
            self._stats.refused_streams += 1
        self._log("Split server refused a stream from node %s: %s", node_id, reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"split server refused the stream: {reason}")
        raise AssertionError("unreachable: context.abort raises")

    def _log(self, message: str, *arguments: object) -> None:
        """A warning, unless this round already logged :data:`_LOGGED_REFUSALS` of them."""
        with self._lock:
            self._logged += 1
            shown = self._logged <= _LOGGED_REFUSALS
        if shown:
            logger.warning(message, *arguments)

    def _serve_stream(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        node_id = self._authenticate(context)
        with self._lock:
            mode = self._mode
        if mode == Mode.EVALUATE:
            steps: _Steps = _EvaluationSteps(self, node_id, self.limits[mode])
        elif self.label_private:
            steps = _LabelPrivateSteps(self, node_id, self.limits[mode])
        elif self.local_loss:
            steps = _LocalLossSteps(self, node_id, self.limits[mode])
        else:
            steps = _PlainSteps(self, node_id, self.limits[mode])
        try:
            yield from self._serve_frames(node_id, requests, context, steps)
        finally:
            steps.abandon()
            with self._lock:
                stream = self._streams.get(node_id)
                if stream is not None and stream.context is context:
                    del self._streams[node_id]

    def _serve_frames(
        self,
        node_id: int,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        steps: _Steps,
    ) -> Iterator[bytes]:
        """Answer each frame through ``steps``; a refused frame gets an ERROR reply."""
        for data in requests:
            with self._lock:
                stream = self._streams.get(node_id)
                if stream is None or stream.context is not context:
                    return  # the round was closed, or the stream idled out, meanwhile
                stream.last_frame = time.monotonic()
                self._steps_in_flight += 1
            step, finished = steps.expected_step, False
            try:
                try:
                    frame = decode_frame(data, limits=steps.limits)
                except WireFormatError as err:
                    raise BatchError(f"{err}. {self._expects}") from err
                step = frame.step
                # Reply in kind: the answer travels in the codec the request came in.
                compression = next(iter(frame.codecs.values()), "none")
                encoded, finished = steps.answer(frame, compression)
            except (WireFormatError, BatchError) as err:
                self._log("Split server refused step %s from node %s: %s", step, node_id, err)
                steps.abandon()
                encoded = encode_frame(Frame(FrameKind.ERROR, step, scalars={"error": str(err)}))
            finally:
                with self._lock:
                    self._steps_in_flight -= 1
                    if not self._steps_in_flight:  # only close_round waits, for zero
                        self._steps_done.notify_all()
            with self._lock:
                self._stats.bytes_received += len(data)
                self._stats.bytes_sent += len(encoded)
                self._stats.batches += int(finished)
                self._stats.refused_batches += int(not finished and not steps.pending)
            yield encoded

    def _watch(self) -> None:
        """Close idle streams and drop label-private batches whose gradient is late."""
        while not self._stopping.wait(_WATCH_INTERVAL):
            now = time.monotonic()
            with self._lock:
                idle = {
                    node_id: stream
                    for node_id, stream in self._streams.items()
                    if now - stream.last_frame > self.idle_timeout
                }
                for node_id in idle:
                    del self._streams[node_id]
                self._stats.idle_streams_closed += len(idle)
            for node_id, stream in idle.items():
                self._log(
                    "Split server closed the stream of node %s: no frame for %.0f s "
                    "(idle_timeout); its slot is free",
                    node_id,
                    self.idle_timeout,
                )
                stream.context.cancel()
            released = self.trainer.abandon_stale(self.hold_timeout)
            if released:
                with self._lock:
                    self._stats.released_holds += len(released)
                self._log(
                    "Split server dropped the waiting batch of node(s) %s: no output gradient "
                    "within %.0f s (hold_timeout); the server half is free",
                    ", ".join(map(str, released)),
                    self.hold_timeout,
                )

    # -- checks of a batch, beyond its header ---------------------------------------------------

    @staticmethod
    def _check_step(frame: Frame, *, expected: int) -> None:
        if frame.step != expected:
            raise BatchError(
                f"expected step {expected}, got {frame.step}: steps on a stream are numbered 1, "
                "2, 3, ... with none skipped or repeated"
            )

    @staticmethod
    def _batch(frame: Frame, *, expected_step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decoded batch's activations and labels (``None`` in the label-private split)."""
        SplitServer._check_step(frame, expected=expected_step)
        activations = frame.tensors["activations"]
        if activations.shape[0] == 0:
            raise BatchError("the batch is empty; skip empty batches on the client")
        if not bool(torch.isfinite(activations).all()):
            raise BatchError(
                "activations contain NaN or infinity; the client half diverged or its input is "
                "not finite: lower the learning rate or check the data"
            )
        return activations, frame.tensors.get("labels")

    @staticmethod
    def _run_server_half(method: Callable[..., _T], *arguments: Any, **keywords: Any) -> _T:
        try:
            return method(*arguments, **keywords)
        except (RefusedBatch, WireFormatError) as err:
            raise BatchError(str(err)) from err
        except Exception as err:  # the server half itself failed on this batch
            raise BatchError(f"the server half failed on this batch: {_first_line(err)}") from err


class _Steps:
    """How one stream's frames are answered; subclasses are the kinds of split and evaluation.

    ``answer`` encodes its reply itself, so that a reply the codec cannot carry is refused
    before the optimizer steps."""

    def __init__(self, server: SplitServer, node_id: int, limits: FrameLimits) -> None:
        self.server, self.node_id, self.limits, self.expected_step = server, node_id, limits, 1

    @property
    def pending(self) -> bool:
        """Whether a batch waits for its second exchange (label-private training)."""
        return False

    def answer(self, frame: Frame, compression: str) -> tuple[bytes, bool]:
        """The encoded reply to ``frame`` and whether it finished a batch; raises on a bad
        frame."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Drop a half-done batch (none unless a batch spans two exchanges)."""


def _encoder(kind: str, step: int, compression: str) -> Callable[[StepResult], bytes]:
    """Encodes the reply carrying a step's cut gradient, in the request's codec."""

    def encode(result: StepResult) -> bytes:
        reply = Frame(
            kind,
            step,
            tensors={"gradient": result.cut_gradient},
            scalars={"loss": result.loss, "correct": result.correct},
        )
        return encode_frame(reply, compression=compression)

    return encode


class _PlainSteps(_Steps):
    """The plain split: FORWARD (activations, labels) is answered by BACKWARD (cut gradient)."""

    def answer(self, frame: Frame, compression: str) -> tuple[bytes, bool]:
        activations, labels = SplitServer._batch(frame, expected_step=self.expected_step)
        assert labels is not None  # the frame limits require them
        encode = _encoder(FrameKind.BACKWARD, frame.step, compression)
        encoded: list[bytes] = []
        SplitServer._run_server_half(
            self.server.trainer.step,
            self.node_id,
            activations,
            labels,
            before_step=lambda result: encoded.append(encode(result)),
        )
        self.expected_step += 1
        return encoded[0], True


class _LocalLossSteps(_Steps):
    """Local-loss training: ACTIVATIONS (activations, labels) is answered by ACK (the loss and
    the correct count, no tensor). The server half trains without the gradient at the cut."""

    def answer(self, frame: Frame, compression: str) -> tuple[bytes, bool]:
        activations, labels = SplitServer._batch(frame, expected_step=self.expected_step)
        assert labels is not None  # the frame limits require them
        encoded: list[bytes] = []

        def acknowledge(result: StepResult) -> None:
            acknowledgement = Frame(
                FrameKind.ACK, frame.step, scalars={"loss": result.loss, "correct": result.correct}
            )
            encoded.append(encode_frame(acknowledgement))

        SplitServer._run_server_half(
            self.server.trainer.step,
            self.node_id,
            activations,
            labels,
            before_step=acknowledge,
            cut_gradient=False,
        )
        self.expected_step += 1
        return encoded[0], True


class _EvaluationSteps(_Steps):
    """Evaluation: EVALUATE (activations, labels) is answered by EVALUATION (loss, correct); in
    the label-private split SMASHED (activations) is answered by SERVER_OUTPUT. Nothing trains."""

    def answer(self, frame: Frame, compression: str) -> tuple[bytes, bool]:
        trainer = self.server.trainer
        activations, labels = SplitServer._batch(frame, expected_step=self.expected_step)
        if labels is None:
            outputs = SplitServer._run_server_half(trainer.evaluate_outputs, activations)
            reply = Frame(FrameKind.SERVER_OUTPUT, frame.step, tensors={"outputs": outputs})
        else:
            loss, correct = SplitServer._run_server_half(trainer.evaluate_loss, activations, labels)
            reply = Frame(
                FrameKind.EVALUATION, frame.step, scalars={"loss": loss, "correct": correct}
            )
        self.expected_step += 1
        return encode_frame(reply, compression=compression), True


class _LabelPrivateSteps(_Steps):
    """The label-private split: SMASHED is answered by SERVER_OUTPUT, then OUTPUT_GRADIENT by
    BACKWARD. A refused frame drops the step's pending batch."""

    def __init__(self, server: SplitServer, node_id: int, limits: FrameLimits) -> None:
        super().__init__(server, node_id, limits)
        self.output_shape: torch.Size | None = None  # while a batch waits for its gradient

    @property
    def pending(self) -> bool:
        return self.output_shape is not None

    def answer(self, frame: Frame, compression: str) -> tuple[bytes, bool]:
        trainer = self.server.trainer
        if self.output_shape is None:
            if frame.kind != FrameKind.SMASHED:
                raise BatchError(
                    f"expected the {FrameKind.SMASHED!r} frame of step {self.expected_step}, "
                    f"got a {frame.kind!r} frame: send a batch's activations first"
                )
            activations, _ = SplitServer._batch(frame, expected_step=self.expected_step)
            outputs = SplitServer._run_server_half(
                trainer.forward_server_half, self.node_id, activations
            )
            reply = Frame(FrameKind.SERVER_OUTPUT, frame.step, tensors={"outputs": outputs})
            try:
                sent = encode_frame(reply, compression=compression)
            except WireFormatError as err:
                trainer.abandon_server_half(self.node_id)
                raise BatchError(str(err)) from err
            self.output_shape = outputs.shape
            return sent, False
        if frame.kind != FrameKind.OUTPUT_GRADIENT:
            raise BatchError(
                f"expected the {FrameKind.OUTPUT_GRADIENT!r} frame of step "
                f"{self.expected_step}, got a {frame.kind!r} frame: send the gradient at the "
                "server half's output before the next batch"
            )
        SplitServer._check_step(frame, expected=self.expected_step)
        gradient = frame.tensors["gradient"]
        if gradient.shape != self.output_shape:
            raise BatchError(
                f"the output gradient has shape {tuple(gradient.shape)}; the server half's "
                f"output had shape {tuple(self.output_shape)}: send one gradient of that shape"
            )
        if not bool(torch.isfinite(gradient).all()):
            raise BatchError(
                "the output gradient contains NaN or infinity; the client head diverged: lower "
                "the learning rate or check the data"
            )
        self.output_shape = None
        encode = _encoder(FrameKind.BACKWARD, frame.step, compression)
        encoded: list[bytes] = []
        SplitServer._run_server_half(
            trainer.backward_server_half,
            self.node_id,
            gradient,
            before_step=lambda result: encoded.append(encode(result)),
        )
        self.expected_step += 1
        return encoded[0], True

    def abandon(self) -> None:
        if self.output_shape is not None:
            self.server.trainer.abandon_server_half(self.node_id)
            self.output_shape = None


def _first_line(err: BaseException, limit: int = 300) -> str:
    """An error's reason for a client: its first line, bounded (torch's errors can carry a C++
    backtrace, which says nothing to a client and tells a stranger about this machine)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
