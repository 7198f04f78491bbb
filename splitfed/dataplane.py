"""The client's end of the data plane.

The training loop talks to the split server through :class:`DataPlane`: send one batch's
activations and labels, get the gradient at the cut back (and, in the label-private split, the
two exchanges of a batch; in evaluation, the loss of a batch). Local-loss training talks through
:class:`LocalLossDataPlane`: send a batch and go on, and collect the acknowledgements at the end.
:class:`GrpcDataPlane` is the gRPC transport of both; another transport implements the same
methods.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import random
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from .protocol import (
    BUSY,
    GRPC_OPTIONS,
    METADATA_MODE,
    METADATA_NODE,
    METADATA_ROUND,
    METADATA_TOKEN,
    STREAM_METHOD,
    DataPlaneTicket,
    Mode,
)
from .wire import (
    Frame,
    FrameKind,
    FrameLimits,
    WireFormatError,
    decode_frame,
    encode_frame,
    validate_compression,
)

__all__ = [
    "Acknowledgement",
    "DataPlane",
    "Exchange",
    "GrpcDataPlane",
    "LocalLossDataPlane",
    "SplitServerError",
]

_CLOSE_TIMEOUT = 5.0
"""Seconds :meth:`GrpcDataPlane.close` waits for the split server to end the stream."""

_ACKNOWLEDGEMENT_LIMITS = FrameLimits(kinds={FrameKind.ACK: {}, FrameKind.ERROR: {}}, max_batch=0)
"""What a local-loss client accepts back: an acknowledgement or an error, never a tensor."""


class SplitServerError(RuntimeError):
    """The split server refused a batch or the stream, or could not be reached."""


@dataclass
class Exchange:
    """The split server's answer to one batch."""

    cut_gradient: torch.Tensor
    loss: float
    correct: int


@dataclass
class Acknowledgement:
    """The split server's answer to one batch of local-loss training: it trained on it."""

    step: int
    loss: float
    """The server half's loss on the batch, before its update."""
    correct: int


class DataPlane(Protocol):
    """What the client's training and evaluation loops need from a transport."""

    def exchange(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> Exchange:
        """Send one batch; return the gradient at the cut for it."""
        ...

    def forward_server_half(self, step: int, activations: torch.Tensor) -> torch.Tensor:
        """Label-private split: send one batch's activations (no labels); return the server
        half's output."""
        ...

    def backward_server_half(self, step: int, output_gradient: torch.Tensor) -> torch.Tensor:
        """Label-private split: send the gradient at the server half's output; return the
        gradient at the cut."""
        ...

    def evaluate(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> Exchange:
        """Evaluation: send one batch; return its loss and correct count (no gradient)."""
        ...

    def close(self) -> None:
        """End the stream."""
        ...


class LocalLossDataPlane(Protocol):
    """What the local-loss training loop needs from a transport: send a batch and go on."""

    def send(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> None:
        """Send one batch for the server half to train on, without waiting for the answer
        (blocking only while the transport's bound of unacknowledged batches is reached)."""
        ...

    def flush(self) -> list[Acknowledgement]:
        """Wait until every batch sent is acknowledged; return the acknowledgements not
        returned before, in the order the batches were sent."""
        ...

    def close(self) -> None:
        """End the stream."""
        ...


class GrpcDataPlane:
    """One gRPC bidirectional stream to the split server, for one client and one round.

    Parameters
    ----------
    address : str
        The split server's ``host:port``.
    node_id : int
        This client's Flower node id.
    server_round : int
        The round the credential is valid for.
    token : str
        The per-round credential from Flower's message.
    mode : str (default: "train")
        What the stream is for: ``"train"`` or ``"evaluate"`` (the credential names it too).
    root_certificates : bytes | None (default: None)
        PEM CA certificate(s) to verify the split server's TLS certificate with; ``None``
        connects in plaintext (a split server started with ``insecure=True``).
    connect_timeout : float (default: 30.0)
        Seconds to wait for the split server to accept the connection.
    compression : str (default: "none")
        How activations travel, and so the gradients the split server returns: ``"none"``
        (exact), ``"fp16"``, ``"bf16"``, ``"int8-row"`` or ``"int8-tensor"`` (see
        :data:`splitfed.wire.COMPRESSIONS`).
    admission_timeout : float (default: 600.0)
        Seconds to keep asking for a stream while the split server serves as many clients at
        once as it allows (it answers ``RESOURCE_EXHAUSTED``); the stream is asked for again
        after a pause that doubles from 0.05 s to 2 s, with jitter.
    max_in_flight : int (default: 8)
        Local-loss training: the most batches sent and not yet acknowledged. :meth:`send`
        blocks, reading acknowledgements, while this many are out, so a client never runs more
        than this many batches ahead of the split server.
    """

    def __init__(
        self,
        *,
        address: str,
        node_id: int,
        server_round: int,
        token: str,
        mode: str = Mode.TRAIN,
        root_certificates: bytes | None = None,
        connect_timeout: float = 30.0,
        compression: str = "none",
        admission_timeout: float = 600.0,
        max_in_flight: int = 8,
    ) -> None:
        if mode not in Mode.ALL:
            raise ValueError(f"mode must be one of {', '.join(Mode.ALL)}; got {mode!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1; got {max_in_flight}")
        try:
            self.compression = validate_compression(compression)
        except WireFormatError as err:
            raise ValueError(str(err)) from None
        self.address = address
        self.max_in_flight = max_in_flight
        self.bytes_sent = 0
        self.bytes_received = 0
        self._unacknowledged: collections.deque[int] = collections.deque()
        self._acknowledgements: list[Acknowledgement] = []
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=GRPC_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise SplitServerError(
                f"could not reach the split server at {address} within {connect_timeout:.0f} s; "
                "check that the ServerApp is running, that this address is reachable from "
                "the client (set split-server-advertised-address if it is not), and, with TLS, "
                "that the split server's certificate names this address and is signed by the "
                "CA in split-server-ca-certfile"
            ) from None
        self.admission_timeout = admission_timeout
        self._metadata = (
            (METADATA_NODE, str(node_id)),
            (METADATA_ROUND, str(server_round)),
            (METADATA_MODE, mode),
            (METADATA_TOKEN, token),
        )
        self._admitted = False  # until the server answered a first frame on this stream
        self._open()

    def _open(self) -> None:
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = self._channel.stream_stream(STREAM_METHOD)
        self._replies = call(iter(self._outbox.get, None), metadata=self._metadata)

    @classmethod
    def from_ticket(
        cls, ticket: DataPlaneTicket, *, node_id: int, max_in_flight: int = 8
    ) -> GrpcDataPlane:
        """Dial the split server a SplitFed message's ticket names."""
        return cls(
            address=ticket.address,
            node_id=node_id,
            server_round=ticket.server_round,
            token=ticket.token,
            mode=ticket.mode,
            root_certificates=ticket.root_certificates.encode() or None,
            compression=ticket.compression,
            max_in_flight=max_in_flight,
        )

    def exchange(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> Exchange:
        reply = self._round_trip(
            Frame(FrameKind.FORWARD, step, tensors={"activations": activations, "labels": labels}),
            expect=FrameKind.BACKWARD,
            tensor="gradient",
        )
        gradient = reply.tensors["gradient"]
        if gradient.shape != activations.shape:
            raise SplitServerError(
                f"the gradient has shape {tuple(gradient.shape)}, the activations "
                f"{tuple(activations.shape)}"
            )
        return Exchange(
            cut_gradient=gradient,
            loss=float(reply.scalars.get("loss", float("nan"))),
            correct=int(reply.scalars.get("correct", 0)),
        )

    def forward_server_half(self, step: int, activations: torch.Tensor) -> torch.Tensor:
        """Label-private split: send activations alone; return the server half's output."""
        reply = self._round_trip(
            Frame(FrameKind.SMASHED, step, tensors={"activations": activations}),
            expect=FrameKind.SERVER_OUTPUT,
            tensor="outputs",
        )
        outputs = reply.tensors["outputs"]
        if outputs.dim() < 1 or outputs.shape[0] != activations.shape[0]:
            raise SplitServerError(
                f"the server half's output has shape {tuple(outputs.shape)} for a batch of "
                f"{activations.shape[0]}"
            )
        return outputs

    def backward_server_half(self, step: int, output_gradient: torch.Tensor) -> torch.Tensor:
        """Label-private split: send the gradient at the server half's output; return the
        gradient at the cut."""
        reply = self._round_trip(
            Frame(FrameKind.OUTPUT_GRADIENT, step, tensors={"gradient": output_gradient}),
            expect=FrameKind.BACKWARD,
            tensor="gradient",
        )
        return reply.tensors["gradient"]

    def evaluate(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> Exchange:
        """Evaluation: send one batch; return its loss and correct count (no gradient)."""
        reply = self._round_trip(
            Frame(FrameKind.EVALUATE, step, tensors={"activations": activations, "labels": labels}),
            expect=FrameKind.EVALUATION,
            tensor=None,
        )
        return Exchange(
            cut_gradient=torch.empty(0),
            loss=float(reply.scalars.get("loss", float("nan"))),
            correct=int(reply.scalars.get("correct", 0)),
        )

    # -- local-loss training: send and go on -------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Local-loss batches sent and not yet acknowledged."""
        return len(self._unacknowledged)

    def send(self, step: int, activations: torch.Tensor, labels: torch.Tensor) -> None:
        """Local-loss training: send one batch for the server half to train on, and return
        without waiting for the answer.

        While :attr:`max_in_flight` batches are unacknowledged it reads acknowledgements first
        (back-pressure). A refusal of an earlier batch is raised here or by :meth:`flush`, as a
        :class:`SplitServerError`.
        """
        frame = Frame(
            FrameKind.ACTIVATIONS, step, tensors={"activations": activations, "labels": labels}
        )
        data = encode_frame(frame, compression=self.compression)
        if not self._admitted:
            # The first batch waits for its answer: a stream the split server is too busy to
            # admit is asked for again, and batches sent on it meanwhile would be lost.
            self._unacknowledged.append(step)
            self._acknowledge(self._send(data, step))
            return
        while len(self._unacknowledged) >= self.max_in_flight:
            self._acknowledge(self._receive())
        self._outbox.put(data)
        self.bytes_sent += len(data)
        self._unacknowledged.append(step)

    def flush(self) -> list[Acknowledgement]:
        """Local-loss training: wait until every batch sent is acknowledged; return the
        acknowledgements not returned before, in the order the batches were sent."""
        while self._unacknowledged:
            self._acknowledge(self._receive())
        acknowledged, self._acknowledgements = self._acknowledgements, []
        return acknowledged

    def _receive(self) -> bytes:
        """The next reply on an admitted stream."""
        step = self._unacknowledged[0]
        try:
            reply: bytes = next(self._replies)
            return reply
        except grpc.RpcError as err:
            raise SplitServerError(
                f"the split server at {self.address} ended the stream at step {step}: "
                f"{err.code().name}: {err.details()}"
            ) from None
        except StopIteration:
            raise SplitServerError(
                f"the split server at {self.address} closed the stream at step {step}"
            ) from None

    def _acknowledge(self, data: bytes) -> None:
        """Take a reply to the oldest batch in flight, which must acknowledge it."""
        self.bytes_received += len(data)
        step = self._unacknowledged[0]
        try:
            reply = decode_frame(data, limits=_ACKNOWLEDGEMENT_LIMITS)
        except WireFormatError as err:
            raise SplitServerError(
                f"unreadable reply from the split server to step {step}: {err}"
            ) from err
        if reply.kind == FrameKind.ERROR:
            raise SplitServerError(
                f"the split server refused step {reply.step}: {reply.scalars.get('error', '?')}"
            )
        if reply.kind != FrameKind.ACK or reply.step != step:
            raise SplitServerError(
                f"expected an {FrameKind.ACK!r} frame for step {step}, got a {reply.kind!r} "
                f"frame for step {reply.step}"
            )
        self._unacknowledged.popleft()
        self._acknowledgements.append(
            Acknowledgement(
                step=step,
                loss=float(reply.scalars.get("loss", float("nan"))),
                correct=int(reply.scalars.get("correct", 0)),
            )
        )

    def _round_trip(self, request: Frame, *, expect: str, tensor: str | None) -> Frame:
        """Send ``request``; return the reply, which must be an ``expect`` frame for the same
        step carrying ``tensor``."""
        data = encode_frame(request, compression=self.compression)
        step = request.step
        reply_data = self._send(data, step)
        self.bytes_received += len(reply_data)
        try:
            reply = decode_frame(reply_data)
        except WireFormatError as err:
            raise SplitServerError(f"unreadable reply from the split server: {err}") from err
        if reply.kind == FrameKind.ERROR:
            raise SplitServerError(
                f"the split server refused step {step}: {reply.scalars.get('error', '?')}"
            )
        if reply.kind != expect or reply.step != step or (tensor and tensor not in reply.tensors):
            raise SplitServerError(
                f"expected a {expect!r} frame for step {step}, got a {reply.kind!r} frame for "
                f"step {reply.step}"
            )
        return reply

    def _send(self, data: bytes, step: int) -> bytes:
        """Send one frame and return the reply's bytes; until the stream is admitted, ask again
        while the split server is at its limit of concurrent streams."""
        deadline = time.monotonic() + self.admission_timeout
        pause = 0.05
        while True:
            self._outbox.put(data)
            self.bytes_sent += len(data)
            try:
                reply: bytes = next(self._replies)
                self._admitted = True
                return reply
            except grpc.RpcError as err:
                busy = (
                    err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and str(err.details()).startswith(BUSY)
                    and not self._admitted
                )
                if not busy or time.monotonic() + pause > deadline:
                    raise SplitServerError(
                        f"the split server at {self.address} ended the stream at step {step}: "
                        f"{err.code().name}: {err.details()}"
                    ) from None
            except StopIteration:
                raise SplitServerError(
                    f"the split server at {self.address} closed the stream at step {step}"
                ) from None
            # Busy: wait for a free stream, then ask again on a new one.
            self._replies.cancel()
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(2 * pause, 2.0)
            self._open()

    def close(self) -> None:
        self._outbox.put(None)
        # Wait (bounded) for the server to end the stream: once this returns, the split server
        # no longer holds it open, so a round closed at once does not cut it as stalled.
        with contextlib.suppress(Exception):
            self._replies.exception(timeout=_CLOSE_TIMEOUT)
        self._replies.cancel()
        self._channel.close()

    def __enter__(self) -> GrpcDataPlane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
