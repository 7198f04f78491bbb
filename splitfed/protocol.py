"""What both ends of the data plane share: the gRPC service, the credential, the ticket.

The strategy hands each selected client a :class:`DataPlaneTicket` inside Flower's message; the
client dials the split server with it. Neither end imports the other: both import this module.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import MISSING, dataclass, fields

from flwr.app import ConfigRecord, Message

__all__ = [
    "BUSY",
    "GRPC_OPTIONS",
    "MAX_FRAME_BYTES",
    "METADATA_MODE",
    "METADATA_NODE",
    "METADATA_ROUND",
    "METADATA_TOKEN",
    "SERVICE",
    "STREAM_METHOD",
    "TICKET_KEY",
    "DataPlaneTicket",
    "Mode",
    "round_token",
]

SERVICE = "splitfed.SplitServer"
STREAM_METHOD = f"/{SERVICE}/Train"
METADATA_NODE = "splitfed-node-id"
METADATA_ROUND = "splitfed-round"
METADATA_MODE = "splitfed-mode"
METADATA_TOKEN = "splitfed-token"

MAX_FRAME_BYTES = 1 << 30
"""gRPC's message-size bound on both ends (its 4 MiB default is smaller than the activations of
large batches). The split server refuses frames far smaller than this from their header: what a
frame may hold is bounded by the activation shape and the server's batch-size limit."""
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
]

BUSY = "split server busy"
"""How the split server's ``RESOURCE_EXHAUSTED`` answer begins when it serves ``max_streams``
streams already: the client asks again later (any other ``RESOURCE_EXHAUSTED``, such as a frame
over gRPC's size limit, ends the stream)."""

TICKET_KEY = "splitfed"
"""Key of the ticket's ``ConfigRecord`` in a SplitFed ``train`` or ``evaluate`` message."""


class Mode:
    """What a data-plane stream is for."""

    TRAIN = "train"
    """Every batch updates the server half and gets the gradient at the cut back."""
    EVALUATE = "evaluate"
    """The server half runs in eval mode, without gradients, and updates nothing."""
    ALL = (TRAIN, EVALUATE)


def round_token(secret: bytes, server_round: int, node_id: int, mode: str = Mode.TRAIN) -> str:
    """The data-plane credential of ``node_id`` for ``server_round`` and ``mode``.

    An HMAC-SHA256 of the round, the mode and the node under a per-run secret: valid for one
    node, one round and one purpose only.
    """
    message = f"{server_round}:{mode}:{node_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DataPlaneTicket:
    """What a client needs from the strategy to take part in a round's data plane.

    It travels as a ``ConfigRecord`` under :data:`TICKET_KEY` in each ``train`` and
    ``evaluate`` message of a SplitFed strategy.
    """

    address: str
    """The split server's ``host:port``, as clients dial it."""
    token: str
    """This node's credential for the round (:func:`round_token`)."""
    server_round: int
    mode: str = Mode.TRAIN
    """:attr:`Mode.TRAIN` or :attr:`Mode.EVALUATE`."""
    resume_local: bool = False
    """Train from this client's own client half of its last round, not the message's arrays."""
    send_client_half: bool = True
    """Reply with the client half; false in rounds after which client halves are not merged."""
    root_certificates: str = ""
    """PEM CA certificate(s) to verify the split server's TLS certificate; empty: plaintext."""
    label_private: bool = False
    """The split server runs the label-private (U-shaped) split."""
    server_loss_reduction: str = "mean"
    """How the split server's loss reduces over a batch (DP-SGD on the client assumes a mean)."""
    compression: str = "none"
    """How activations and gradients travel on the data plane (see :mod:`splitfed.wire`)."""
    proximal_mu: float = 0.0
    """FedProx: weight of the proximal term ``mu/2 ||w - w_round_start||^2`` on the client."""
    max_batch_size: int = 0
    """The most examples the split server accepts in one batch; 0: no limit announced."""
    variant: str = "v1"
    """The variant the split server runs (:class:`splitfed.Variant`); ``"local-loss"`` changes
    what the client does (it trains on an auxiliary head's loss and waits for no gradient)."""
    send_every: int = 1
    """Local-loss: the client sends every this many batches to the split server (CSE-FSL's
    ``k``); the others train the client half alone."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_message(cls, msg: Message) -> DataPlaneTicket:
        """Read the ticket of a SplitFed message; raise with the fix if there is none."""
        records = msg.content.config_records
        if TICKET_KEY not in records:
            raise ValueError(
                f"the {msg.metadata.message_type} message has no {TICKET_KEY!r} record: it was "
                "not sent by a SplitFed strategy. Use splitfed.SplitFed in the ServerApp"
            )
        record = records[TICKET_KEY]
        kinds = {f.name: type(f.default) for f in fields(cls) if f.default is not MISSING}
        kinds |= {"address": str, "token": str, "server_round": int}
        try:
            values = {
                name: kind(record[name.replace("_", "-")])
                for name, kind in kinds.items()
                if name.replace("_", "-") in record
            }
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"the {TICKET_KEY!r} record of the message is not valid: {err}"
            ) from err
