"""The client side: local epochs of the client half, driven through the data plane.

:func:`train_client_half` is what a ``ClientApp`` calls from its ``@app.train()`` handler: one
Flower ``train`` message carries the whole local training of a round. :func:`run_local_epochs` is
the training loop itself, independent of Flower.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from .config import OptimizerConfig, load_optimizer_state, save_optimizer_state
from .cut import client_state_dict, load_client_state_dict
from .dataplane import DataPlane, GrpcDataPlane, LabelPrivateDataPlane, SplitServerError
from .privacy import PrivacyConfig, distance_correlation, make_client_half_private

__all__ = ["DataPlaneTicket", "TrainStats", "peak_rss_mb", "run_local_epochs", "train_client_half"]

# Keys of what the plugin adds to Flower messages and to a node's context.state.
TICKET_KEY = "splitfed"
STATE_OPTIMIZER_KEY = "splitfed.client-optimizer"
STATE_CLIENT_HALF_KEY = "splitfed.client-half"
STATE_PRIVACY_KEY = "splitfed.privacy"


@dataclass(frozen=True)
class DataPlaneTicket:
    """What a client needs from the strategy to take part in a round's data plane.

    It travels as a ``ConfigRecord`` under the key ``"splitfed"`` in each ``train`` message.
    """

    address: str
    token: str
    server_round: int
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
    """How activations and gradients travel on the data plane (see ``splitfed.wire``)."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "address": self.address,
                "token": self.token,
                "server-round": self.server_round,
                "resume-local": self.resume_local,
                "send-client-half": self.send_client_half,
                "root-certificates": self.root_certificates,
                "label-private": self.label_private,
                "server-loss-reduction": self.server_loss_reduction,
                "compression": self.compression,
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> DataPlaneTicket:
        if TICKET_KEY not in msg.content.config_records:
            raise ValueError(
                "the train message has no 'splitfed' record: it was not sent by a SplitFed "
                "strategy. Use strategies.SplitFed in the ServerApp"
            )
        record = msg.content.config_records[TICKET_KEY]
        return cls(
            address=str(record["address"]),
            token=str(record["token"]),
            server_round=int(record["server-round"]),
            resume_local=bool(record["resume-local"]),
            send_client_half=bool(record["send-client-half"]),
            root_certificates=str(record.get("root-certificates", "")),
            label_private=bool(record.get("label-private", False)),
            server_loss_reduction=str(record.get("server-loss-reduction", "mean")),
            compression=str(record.get("compression", "none")),
        )


@dataclass
class TrainStats:
    """What a client's local training did."""

    num_examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    def metrics(self) -> MetricRecord:
        """The reply's metrics; ``num-examples`` weights FedAvg."""
        n = max(self.num_examples, 1)
        return MetricRecord(
            {
                "num-examples": self.num_examples,
                "train-loss": self.loss_sum / n,
                "train-accuracy": self.correct / n,
                "steps": self.steps,
                "train-seconds": self.seconds,
                # The whole process: in simulation a Ray actor that may have run other clients.
                "peak-rss-mb": peak_rss_mb(),
            }
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_local_epochs(
    *,
    client_half: nn.Module,
    data_plane: DataPlane | LabelPrivateDataPlane,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    local_epochs: int = 1,
    proximal_mu: float = 0.0,
    client_head: nn.Module | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    privacy: PrivacyConfig | None = None,
    generator: torch.Generator | None = None,
) -> TrainStats:
    """Train ``client_half`` for ``local_epochs`` over ``train_loader`` through ``data_plane``.

    For each batch: forward the client half, send the activations and labels, receive the
    gradient at the cut, backpropagate it through the graph kept from the forward pass, and step
    ``optimizer``. With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` is
    added to the client half's loss, ``w_start`` being the weights it started the round with.

    With ``client_head`` (the label-private split, a :class:`LabelPrivateDataPlane`), labels stay
    here: the activations go up alone, the server half's output comes back, the client head and
    ``loss_fn`` (default: cross-entropy, averaged over the batch) run on it, the gradient at the
    server half's output goes up and the gradient at the cut comes back. ``optimizer`` must then
    hold the client head's parameters as well. ``privacy`` applies the client-side defenses
    (noise drawn from ``generator``).
    """
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be at least 1; got {local_epochs}")
    device = next(client_half.parameters()).device
    start_weights = (
        [p.detach().clone() for p in client_half.parameters()] if proximal_mu > 0 else []
    )
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    defended = privacy is not None and privacy.enabled
    stats = TrainStats()
    started = time.perf_counter()
    client_half.train()
    if client_head is not None:
        client_head.train()
    for _ in range(local_epochs):
        for inputs, labels in train_loader:
            if len(labels) == 0:
                continue
            stats.steps += 1
            if client_head is None and not defended:
                activations = client_half(inputs.to(device))
                reply = data_plane.exchange(stats.steps, activations.detach(), labels)
                optimizer.zero_grad(set_to_none=True)
                activations.backward(reply.cut_gradient.to(device))
                loss, correct = reply.loss, reply.correct
            else:
                loss, correct = _defended_step(
                    stats.steps,
                    inputs.to(device),
                    labels,
                    client_half=client_half,
                    client_head=client_head,
                    data_plane=data_plane,
                    optimizer=optimizer,
                    loss_fn=loss_fn,
                    privacy=privacy if defended else None,
                    generator=generator,
                )
            if proximal_mu > 0:
                for param, start in zip(client_half.parameters(), start_weights, strict=True):
                    if param.grad is not None:
                        param.grad.add_(param.detach() - start, alpha=proximal_mu)
            optimizer.step()
            stats.num_examples += len(labels)
            stats.loss_sum += loss * len(labels)
            stats.correct += correct
    stats.seconds = time.perf_counter() - started
    return stats


def _defended_step(
    step: int,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    client_half: nn.Module,
    client_head: nn.Module | None,
    data_plane,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    privacy: PrivacyConfig | None,
    generator: torch.Generator | None,
) -> tuple[float, int]:
    """One batch of the label-private split and/or with defenses; leaves the gradients set."""
    activations = client_half(inputs)
    sent = (
        activations
        if privacy is None
        else privacy.protect_smashed(activations, generator=generator)
    )
    if client_head is None:
        reply = data_plane.exchange(step, sent.detach(), labels)
        optimizer.zero_grad(set_to_none=True)
        cut_gradient, loss, correct = reply.cut_gradient, reply.loss, reply.correct
    else:
        outputs = data_plane.forward_server_half(step, sent.detach())
        outputs = outputs.to(sent.device).requires_grad_(True)
        logits = client_head(outputs)
        labels = labels.to(logits.device)
        head_loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        head_loss.backward()
        output_gradient = outputs.grad
        if privacy is not None:
            output_gradient = privacy.protect_output_gradient(output_gradient, generator=generator)
        cut_gradient = data_plane.backward_server_half(step, output_gradient.detach())
        if cut_gradient.shape != sent.shape:
            raise SplitServerError(
                f"the gradient at the cut has shape {tuple(cut_gradient.shape)}, the activations "
                f"{tuple(sent.shape)}"
            )
        loss = float(head_loss.detach())
        correct = int((logits.detach().argmax(dim=1) == labels).sum()) if logits.dim() == 2 else 0
    roots, gradients = [sent], [cut_gradient.to(sent.device)]
    if privacy is not None and privacy.nopeek_weight > 0 and len(inputs) >= 4:
        roots.append(privacy.nopeek_weight * distance_correlation(inputs, activations))
        gradients.append(None)
    torch.autograd.backward(roots, gradients)
    return loss, correct


def train_client_half(
    msg: Message,
    context: Context,
    *,
    client_half: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: OptimizerConfig,
    local_epochs: int = 1,
    reset_optimizer: bool = False,
    client_head: nn.Module | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    privacy: PrivacyConfig | None = None,
) -> Message:
    """Handle one SplitFed ``train`` message: load, train through the split server, reply.

    Call it from a ``ClientApp``'s ``@app.train()`` handler. The reply holds the updated client
    half (one ``ArrayRecord``) and a ``MetricRecord`` with ``num-examples``, so any Flower
    aggregation strategy accepts it.

    Parameters
    ----------
    msg : Message
        The ``train`` message from a SplitFed strategy.
    context : Context
        This node's context; the optimizer state persists in ``context.state``.
    client_half : nn.Module
        A module with the client half's architecture; its weights are replaced by the message's.
    train_loader : Iterable[tuple[Tensor, Tensor]]
        This client's training batches, ``(inputs, labels)``.
    optimizer : OptimizerConfig
        The client-half optimizer.
    local_epochs : int (default: 1)
        Passes over ``train_loader`` per round.
    reset_optimizer : bool (default: False)
        Start each round with a fresh optimizer instead of the state kept from the last round.
    client_head : nn.Module | None (default: None)
        The label-private (U-shaped) split: the client head, which computes ``loss_fn`` here so
        that labels never leave the client. Its weights travel in the same ``ArrayRecord`` as
        the client half's (keys prefixed ``client-head.``) and are merged with them.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The client head's loss, averaged over the batch; ``None`` means cross-entropy.
    privacy : PrivacyConfig | None (default: None)
        Client-side defenses, validated here; their epsilons, accumulated over this node's
        rounds, are added to the reply's metrics.
    """
    ticket = DataPlaneTicket.from_message(msg)
    label_private = client_head is not None
    if ticket.label_private != label_private:
        raise ValueError(
            f"the split server runs the {'label-private' if ticket.label_private else 'plain'} "
            f"split and this client the {'label-private' if label_private else 'plain'} one: "
            "set label-private the same on both sides (and pass client_head exactly when it is "
            "true)"
        )
    if privacy is not None:
        privacy.validate(
            label_private=label_private,
            client_half=client_half,
            server_loss_reduction=ticket.server_loss_reduction,
        )
    arrays = _single_array_record(msg)
    if ticket.resume_local and STATE_CLIENT_HALF_KEY in context.state.array_records:
        arrays = context.state.array_records[STATE_CLIENT_HALF_KEY]
    if client_head is None:
        client_half.load_state_dict(arrays.to_torch_state_dict())
    else:
        load_client_state_dict(client_half, client_head, arrays.to_torch_state_dict())

    parameters = list(client_half.parameters())
    if client_head is not None:
        parameters += list(client_head.parameters())
    torch_optimizer = optimizer.build(parameters)
    saved = context.state.config_records.get(STATE_OPTIMIZER_KEY)
    if saved is not None and not reset_optimizer:
        load_optimizer_state(torch_optimizer, saved["state"])

    # FedProx as the client-half aggregator puts "proximal-mu" into the round's config.
    proximal_mu = next(
        (
            float(record["proximal-mu"])
            for key, record in msg.content.config_records.items()
            if key != TICKET_KEY and "proximal-mu" in record
        ),
        0.0,
    )
    with GrpcDataPlane(
        address=ticket.address,
        node_id=msg.metadata.dst_node_id,
        server_round=ticket.server_round,
        token=ticket.token,
        root_certificates=ticket.root_certificates.encode() or None,
        compression=ticket.compression,
    ) as data_plane:
        trained, step_optimizer = client_half, torch_optimizer
        if privacy is not None and privacy.dp_sgd:
            batch_size = getattr(train_loader, "batch_size", None)
            if not batch_size:
                raise ValueError(
                    "DP-SGD needs the batch size: pass a torch DataLoader with a batch_size"
                )
            trained, step_optimizer = make_client_half_private(
                client_half=client_half,
                optimizer=torch_optimizer,
                noise_multiplier=privacy.dp_noise_multiplier,
                max_grad_norm=privacy.dp_max_grad_norm,
                expected_batch_size=int(batch_size),
                grad_sample_mode=privacy.grad_sample_mode,
            )
        try:
            stats = run_local_epochs(
                client_half=trained,
                data_plane=data_plane,
                train_loader=train_loader,
                optimizer=step_optimizer,
                local_epochs=local_epochs,
                proximal_mu=proximal_mu,
                client_head=client_head,
                loss_fn=loss_fn,
                privacy=privacy,
            )
        finally:
            if trained is not client_half:
                trained.remove_hooks()

    metrics = stats.metrics()
    if privacy is not None and privacy.enabled:
        # Each example is sent once per local epoch and takes part in one DP-SGD step per epoch.
        seen = context.state.config_records.get(STATE_PRIVACY_KEY)
        epochs = local_epochs + (int(seen["epochs"]) if seen is not None else 0)
        context.state[STATE_PRIVACY_KEY] = ConfigRecord({"epochs": epochs})
        for key, value in privacy.epsilons(releases=epochs, dp_steps=epochs).items():
            metrics[key] = value

    if client_head is None:
        updated = ArrayRecord(client_half.state_dict())
    else:
        updated = ArrayRecord(client_state_dict(client_half, client_head))
    if not reset_optimizer:
        context.state[STATE_OPTIMIZER_KEY] = ConfigRecord(
            {"state": save_optimizer_state(torch_optimizer)}
        )
    if not ticket.send_client_half:
        context.state[STATE_CLIENT_HALF_KEY] = updated
    elif STATE_CLIENT_HALF_KEY in context.state.array_records:
        del context.state[STATE_CLIENT_HALF_KEY]
    reply_arrays = updated if ticket.send_client_half else ArrayRecord()
    return Message(RecordDict({"arrays": reply_arrays, "metrics": metrics}), reply_to=msg)


def _single_array_record(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if len(records) != 1:
        raise ValueError(
            f"the train message should carry exactly one ArrayRecord (the global client half); "
            f"it carries {len(records)}: {sorted(records)}"
        )
    return next(iter(records.values()))
