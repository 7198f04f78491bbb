"""The split server: a gRPC service that runs the server half for every batch.

Each selected client opens one bidirectional stream per round and sends FORWARD frames
(step, activations, labels); for each it gets back a BACKWARD frame (the gradient at the cut, the
loss) or an ERROR frame that says why the batch was refused. A bad batch is answered on its own
stream only; every other client keeps being served. In an evaluation round, EVALUATE frames are
answered with the batch's loss (EVALUATION) and nothing is trained.

Streams authenticate with a token derived from a per-run secret, the round, the mode and the node
id (HMAC-SHA256, :func:`splitfed.protocol.round_token`); it reaches the client inside Flower's
message, and only nodes selected for the current round hold a valid one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
import torch

from .protocol import (
    GRPC_OPTIONS,
    METADATA_MODE,
    METADATA_NODE,
    METADATA_ROUND,
    METADATA_TOKEN,
    SERVICE,
    Mode,
    round_token,
)
from .server_half import RefusedBatch, ServerHalfTrainer
from .tls import TLSCredentials
from .wire import Frame, FrameKind, WireFormatError, decode_frame, encode_frame

__all__ = ["BatchError", "RoundStats", "SplitServer"]

logger = logging.getLogger("flwr_splitfed")
_T = TypeVar("_T")


class BatchError(ValueError):
    """A batch does not match what the server half expects."""


@dataclass
class RoundStats:
    """What crossed the data plane in one round."""

    server_round: int
    mode: str = Mode.TRAIN
    bytes_received: int = 0
    bytes_sent: int = 0
    batches: int = 0
    refused_batches: int = 0
    refused_streams: int = 0
    examples_by_node: dict[int, int] = field(default_factory=dict)

    @property
    def data_plane_bytes(self) -> int:
        """Bytes in both directions."""
        return self.bytes_received + self.bytes_sent


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
        Most concurrent client streams; one more is refused with RESOURCE_EXHAUSTED.
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
        tls: TLSCredentials | None = None,
        insecure: bool = False,
        label_private: bool = False,
        intra_op_threads: int | None = None,
    ) -> None:
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(
                f"intra_op_threads must be at least 1, or None to leave torch's setting; got "
                f"{intra_op_threads}"
            )
        if tls is None and not insecure:
            raise ValueError(
                "the split server needs TLS credentials: pass tls=TLSCredentials.from_files("
                "certfile=..., keyfile=..., ca_certfile=...), or insecure=True to serve "
                "plaintext on a single machine or a private network"
            )
        if tls is not None and insecure:
            raise ValueError("pass either tls=... or insecure=True, not both")
        self.tls = tls
        self.trainer = trainer
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.bind_address = address
        self._advertised = advertised_address or None
        self.max_streams = max_streams
        self.label_private = label_private
        self.intra_op_threads = intra_op_threads
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._steps_done = threading.Condition(self._lock)
        self._round = 0
        self._mode = Mode.TRAIN
        self._selected: frozenset[int] = frozenset()
        self._stats = RoundStats(server_round=0)
        self._streams: dict[int, grpc.ServicerContext] = {}  # open streams of this round
        self._steps_in_flight = 0
        self._server: grpc.Server | None = None
        self.address: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving; return the address clients should dial."""
        if self._server is not None:
            raise RuntimeError("the split server is already running; call stop() first")
        if self.intra_op_threads is not None:
            torch.set_num_threads(self.intra_op_threads)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.max_streams, thread_name_prefix="split-server"),
            options=GRPC_OPTIONS,
            maximum_concurrent_rpcs=self.max_streams,
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
        bound = f"{host}:{port}"
        if self._advertised:
            self.address = self._advertised
        elif host in ("0.0.0.0", "[::]", ""):
            self.address = f"{socket.gethostname()}:{port}"
        else:
            self.address = bound
        logger.info(
            "Split server listening on %s with %s (clients dial %s)",
            bound,
            "TLS" if self.tls else "no TLS",
            self.address,
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
            self._stats = RoundStats(server_round=server_round, mode=mode)
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
            for node_id, context in open_streams.items():
                logger.warning(
                    "Split server cut the stream of node %s: round %s ended before the client "
                    "finished (it stalled, failed, or its reply came too late)",
                    node_id,
                    self._round,
                )
                context.cancel()
            self._steps_done.wait_for(lambda: self._steps_in_flight == 0)
            stats, mode = self._stats, self._mode
        if mode == Mode.TRAIN:
            stats.examples_by_node = dict(self.trainer.examples_by_node)
        else:
            self.trainer.end_evaluation()
        return stats

    # -- the stream -----------------------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> int:
        metadata = dict(context.invocation_metadata())
        try:
            node_id = int(metadata[METADATA_NODE])
            server_round = int(metadata[METADATA_ROUND])
            mode = str(metadata.get(METADATA_MODE, Mode.TRAIN))
            token = str(metadata[METADATA_TOKEN])
        except (KeyError, ValueError):
            self._refuse(context, "?", "the stream carries no valid credential metadata")
        with self._lock:
            current_round, current_mode, selected = self._round, self._mode, self._selected
        expected = round_token(self._secret, server_round, node_id, mode)
        if not hmac.compare_digest(expected, token):
            self._refuse(context, node_id, "the credential is not valid for this run")
        if server_round != current_round or mode != current_mode or node_id not in selected:
            self._refuse(
                context,
                node_id,
                f"node is not selected for the {mode} of round {server_round} (now: the "
                f"{current_mode} of round {current_round})",
            )
        with self._lock:
            duplicate = node_id in self._streams
            if not duplicate:
                self._streams[node_id] = context
        if duplicate:
            self._refuse(context, node_id, "the node already has a stream open in this round")
        return node_id

    def _refuse(self, context: grpc.ServicerContext, node_id: object, reason: str) -> NoReturn:
        with self._lock:
            self._stats.refused_streams += 1
        logger.warning("Split server refused a stream from node %s: %s", node_id, reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"split server refused the stream: {reason}")
        raise AssertionError("unreachable: context.abort raises")

    def _serve_stream(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        node_id = self._authenticate(context)
        with self._lock:
            mode = self._mode
        if mode == Mode.EVALUATE:
            steps: _Steps = _EvaluationSteps(self, node_id)
        elif self.label_private:
            steps = _LabelPrivateSteps(self, node_id)
        else:
            steps = _PlainSteps(self, node_id)
        try:
            yield from self._serve_frames(node_id, requests, context, steps)
        finally:
            steps.abandon()
            with self._lock:
                if self._streams.get(node_id) is context:
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
                if self._streams.get(node_id) is not context:
                    return  # the round was closed while this frame was on its way
                self._steps_in_flight += 1
            step, compression, finished = steps.expected_step, "none", False
            try:
                frame = decode_frame(data)
                step = frame.step
                # Reply in kind: the answer travels in the codec the request came in.
                compression = next(iter(frame.codecs.values()), "none")
                reply, finished = steps.answer(frame)
            except (WireFormatError, BatchError) as err:
                logger.warning("Split server refused step %s from node %s: %s", step, node_id, err)
                steps.abandon()
                reply = Frame(FrameKind.ERROR, step, scalars={"error": str(err)})
            finally:
                with self._lock:
                    self._steps_in_flight -= 1
                    if not self._steps_in_flight:  # only close_round waits, for zero
                        self._steps_done.notify_all()
            try:
                encoded = encode_frame(reply, compression=compression)
            except WireFormatError as err:  # e.g. a gradient beyond float16's range
                logger.warning(
                    "Split server cannot send step %s to node %s: %s", step, node_id, err
                )
                steps.abandon()
                reply = Frame(FrameKind.ERROR, step, scalars={"error": str(err)})
                encoded, finished = encode_frame(reply), False
            with self._lock:
                self._stats.bytes_received += len(data)
                self._stats.bytes_sent += len(encoded)
                self._stats.batches += int(finished)
                self._stats.refused_batches += int(reply.kind == FrameKind.ERROR)
            yield encoded

    def _validate_batch(
        self, frame: Frame, *, expected_step: int, kind: str = FrameKind.FORWARD
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a FORWARD frame's activations and labels, or raise :class:`BatchError`.

        With ``kind=SMASHED`` (the label-private split) the frame must carry no labels, and the
        labels returned are an empty placeholder.
        """
        if frame.kind != kind:
            raise BatchError(
                f"expected a {kind!r} frame, got {frame.kind!r}"
                + (
                    "; the client and the split server must both run the label-private split "
                    "(a model cut with a server_cut), or both the plain one"
                    if FrameKind.SMASHED in (kind, frame.kind)
                    else ""
                )
            )
        if kind == FrameKind.SMASHED:
            if "labels" in frame.tensors:
                raise BatchError(
                    "the frame carries labels, which stay on the client in the label-private "
                    "split; send the activations alone"
                )
            smashed = frame.tensors.get("activations")
            count = smashed.shape[0] if smashed is not None and smashed.dim() >= 1 else 0
            frame = Frame(
                frame.kind, frame.step, tensors={**frame.tensors, "labels": torch.empty(count)}
            )
        if frame.step != expected_step:
            raise BatchError(
                f"expected step {expected_step}, got {frame.step}: steps on a stream are "
                "numbered 1, 2, 3, ... with none skipped or repeated"
            )
        missing = {"activations", "labels"} - frame.tensors.keys()
        if missing:
            raise BatchError(f"the batch lacks {', '.join(sorted(missing))}")
        activations, labels = frame.tensors["activations"], frame.tensors["labels"]
        if activations.dtype != self.activation_dtype:
            raise BatchError(
                f"activations are {activations.dtype}, the server half expects "
                f"{self.activation_dtype}; cast the client half's output before sending"
            )
        if activations.dim() < 1 or tuple(activations.shape[1:]) != self.activation_shape:
            raise BatchError(
                f"activations have shape {tuple(activations.shape)}, the server half expects "
                f"(batch, {', '.join(map(str, self.activation_shape))}); check that the client "
                "runs the same client half and cut as the server"
            )
        if labels.dim() < 1 or labels.shape[0] != activations.shape[0]:
            raise BatchError(
                f"{activations.shape[0]} activations came with labels of shape "
                f"{tuple(labels.shape)}; send one label per example"
            )
        if activations.shape[0] == 0:
            raise BatchError("the batch is empty; skip empty batches on the client")
        if not bool(torch.isfinite(activations).all()):
            raise BatchError(
                "activations contain NaN or infinity; the client half diverged or its input is "
                "not finite: lower the learning rate or check the data"
            )
        return activations, labels

    @staticmethod
    def _run_server_half(method: Callable[..., _T], *arguments: Any) -> _T:
        try:
            return method(*arguments)
        except RefusedBatch as err:
            raise BatchError(str(err)) from err
        except Exception as err:  # the server half itself failed on this batch
            raise BatchError(f"the server half failed on this batch: {_first_line(err)}") from err

    @staticmethod
    def _validate_output_gradient(
        frame: Frame, *, expected_step: int, output_shape: torch.Size
    ) -> torch.Tensor:
        """Return an OUTPUT_GRADIENT frame's gradient, or raise :class:`BatchError`."""
        if frame.kind != FrameKind.OUTPUT_GRADIENT or frame.step != expected_step:
            raise BatchError(
                f"expected the {FrameKind.OUTPUT_GRADIENT!r} frame of step {expected_step}, got "
                f"a {frame.kind!r} frame of step {frame.step}: send the gradient at the server "
                "half's output before the next batch"
            )
        gradient = frame.tensors.get("gradient")
        if gradient is None:
            raise BatchError("the output-gradient frame lacks its 'gradient' tensor")
        if gradient.shape != output_shape or not gradient.is_floating_point():
            raise BatchError(
                f"the output gradient has shape {tuple(gradient.shape)} and dtype "
                f"{gradient.dtype}; the server half's output had shape {tuple(output_shape)}: "
                "send one floating-point gradient of the same shape"
            )
        if not bool(torch.isfinite(gradient).all()):
            raise BatchError(
                "the output gradient contains NaN or infinity; the client head diverged: lower "
                "the learning rate or check the data"
            )
        return gradient


class _Steps:
    """How one stream's frames are answered; subclasses are the kinds of split and evaluation."""

    def __init__(self, server: SplitServer, node_id: int) -> None:
        self.server, self.node_id, self.expected_step = server, node_id, 1

    def answer(self, frame: Frame) -> tuple[Frame, bool]:
        """The reply to ``frame`` and whether it finished a batch; raises on a bad frame."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Drop a half-done batch (none unless a batch spans two exchanges)."""


class _PlainSteps(_Steps):
    """The plain split: FORWARD (activations, labels) is answered by BACKWARD (cut gradient)."""

    def answer(self, frame: Frame) -> tuple[Frame, bool]:
        activations, labels = self.server._validate_batch(frame, expected_step=self.expected_step)
        result = SplitServer._run_server_half(
            self.server.trainer.step, self.node_id, activations, labels
        )
        self.expected_step += 1
        reply = Frame(
            FrameKind.BACKWARD,
            frame.step,
            tensors={"gradient": result.cut_gradient},
            scalars={"loss": result.loss, "correct": result.correct},
        )
        return reply, True


class _EvaluationSteps(_Steps):
    """Evaluation: EVALUATE (activations, labels) is answered by EVALUATION (loss, correct); in
    the label-private split SMASHED (activations) is answered by SERVER_OUTPUT. Nothing trains."""

    def answer(self, frame: Frame) -> tuple[Frame, bool]:
        trainer = self.server.trainer
        if self.server.label_private:
            activations, _ = self.server._validate_batch(
                frame, expected_step=self.expected_step, kind=FrameKind.SMASHED
            )
            outputs = SplitServer._run_server_half(trainer.evaluate_outputs, activations)
            self.expected_step += 1
            return Frame(FrameKind.SERVER_OUTPUT, frame.step, tensors={"outputs": outputs}), True
        activations, labels = self.server._validate_batch(
            frame, expected_step=self.expected_step, kind=FrameKind.EVALUATE
        )
        loss, correct = SplitServer._run_server_half(trainer.evaluate_loss, activations, labels)
        self.expected_step += 1
        reply = Frame(FrameKind.EVALUATION, frame.step, scalars={"loss": loss, "correct": correct})
        return reply, True


class _LabelPrivateSteps(_Steps):
    """The label-private split: SMASHED is answered by SERVER_OUTPUT, then OUTPUT_GRADIENT by
    BACKWARD. A refused frame drops the step's pending batch."""

    def __init__(self, server: SplitServer, node_id: int) -> None:
        super().__init__(server, node_id)
        self.output_shape: torch.Size | None = None  # while a batch waits for its gradient

    def answer(self, frame: Frame) -> tuple[Frame, bool]:
        trainer = self.server.trainer
        if self.output_shape is None:
            activations, _ = self.server._validate_batch(
                frame, expected_step=self.expected_step, kind=FrameKind.SMASHED
            )
            outputs = SplitServer._run_server_half(
                trainer.forward_server_half, self.node_id, activations
            )
            self.output_shape = outputs.shape
            return Frame(FrameKind.SERVER_OUTPUT, frame.step, tensors={"outputs": outputs}), False
        gradient = SplitServer._validate_output_gradient(
            frame, expected_step=self.expected_step, output_shape=self.output_shape
        )
        self.output_shape = None
        result = SplitServer._run_server_half(trainer.backward_server_half, self.node_id, gradient)
        self.expected_step += 1
        return Frame(
            FrameKind.BACKWARD, frame.step, tensors={"gradient": result.cut_gradient}
        ), True

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
