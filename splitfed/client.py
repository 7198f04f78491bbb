"""The Flower adapter of the client side: one call per ``ClientApp`` handler.

:func:`train_client_half` serves a ``ClientApp``'s ``@app.train()`` handler, and
:func:`evaluate_client_half` its ``@app.evaluate()`` handler: each reads the strategy's ticket,
restores the client's parts from the message (and the node's ``context.state``), runs the
Flower-free loop of :mod:`splitfed.training` through the split server, and replies in the shape
Flower's strategies aggregate (one ``ArrayRecord``, one ``MetricRecord`` with ``num-examples``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from ._state import seeded
from .config import OptimizerConfig, Variant, load_optimizer_state, save_optimizer_state
from .cut import SplitModel
from .dataplane import GrpcDataPlane
from .privacy import ClientSecret, PrivacyConfig
from .protocol import DataPlaneTicket, Mode
from .resources import peak_rss_mb
from .training import (
    LossFn,
    TrainStats,
    Unpack,
    evaluate_locally,
    run_local_epochs,
    run_local_loss_epochs,
)

__all__ = ["evaluate_client_half", "train_client_half"]

logger = logging.getLogger("flwr_splitfed")

# A failure that repeats every round shows its traceback once in this process's log.
_LOGGED_REASONS: set[str] = set()
_MAX_LOGGED_REASONS = 64

# What the plugin keeps in a node's context.state between rounds.
STATE_OPTIMIZER_KEY = "splitfed.client-optimizer"
STATE_CLIENT_HALF_KEY = "splitfed.client-half"
STATE_PRIVACY_KEY = "splitfed.privacy"
STATE_CLIENT_HEAD_KEY = "splitfed.client-head"
"""The client head a client keeps to itself (label-private split, heads kept local)."""

MetricValue = int | float


def train_client_half(
    msg: Message,
    context: Context,
    *,
    split: SplitModel,
    train_loader: Iterable[Any],
    optimizer: OptimizerConfig,
    local_epochs: int = 1,
    reset_optimizer: bool = False,
    loss_fn: LossFn | None = None,
    privacy: PrivacyConfig | None = None,
    batch: Unpack | None = None,
    metrics: Mapping[str, MetricValue] | None = None,
    secret: ClientSecret | None = None,
    keep_client_head: bool | None = None,
) -> Message:
    """Handle one SplitFed ``train`` message: restore, train through the split server, reply.

    Call it from a ``ClientApp``'s ``@app.train()`` handler. A failure (a split server that
    refuses a batch, a model that does not fit the message, ...) becomes Flower's error reply with
    its reason, which the strategy logs and counts; its traceback is logged here once per reason,
    so that a failure that repeats every round does not flood the log. The reply holds the client's
    updated parts (one ``ArrayRecord``: the client half, and the client head in the
    label-private split or the auxiliary head in local-loss training) and a ``MetricRecord``
    with ``num-examples``, so any Flower strategy aggregates it. Add records of your own to the
    returned message's content (a ``ConfigRecord`` ...); metrics go into its one
    ``MetricRecord`` (``metrics=``), which FedAvg requires to be the only one.

    The ticket says the variant. In local-loss training (``"local-loss"``) the client trains its
    half on the loss of ``split.aux_head`` and streams every ``send_every``-th batch to the split
    server without waiting (:func:`splitfed.run_local_loss_epochs`); ``split`` must then carry
    the auxiliary head the ServerApp's split carries, and must not carry one otherwise.

    Parameters
    ----------
    msg : Message
        The ``train`` message from a SplitFed strategy.
    context : Context
        This node's context; the optimizer state persists in ``context.state``.
    split : SplitModel
        The client's parts, from :func:`splitfed.split_model` (the server half may stay on the
        ``meta`` device: clients never run it). Their weights are replaced by the message's.
    train_loader : Iterable
        This client's training batches: ``(inputs, labels)`` tuples or dicts (see ``batch``).
    optimizer : OptimizerConfig
        How to build the optimizer of the client's parts.
    local_epochs : int (default: 1)
        Passes over ``train_loader`` per round.
    reset_optimizer : bool (default: False)
        Start each round with a fresh optimizer instead of the state kept from the last round.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The label-private split: the client head's loss, averaged over the batch; local-loss
        training: the auxiliary head's. ``None`` means cross-entropy. (In the plain split the
        loss is the split server's.)
    privacy : PrivacyConfig | None (default: None)
        Client-side defenses, validated here; their epsilons, accumulated over this node's
        rounds, are added to the reply's metrics.
    batch : BatchSpec | Callable | None (default: None)
        Which entries of a batch are the inputs and which the labels (see
        :class:`splitfed.BatchSpec`); checked on the first batch.
    metrics : Mapping[str, int | float] | None (default: None)
        Metrics of your own, added to the reply's ``MetricRecord``.
    secret : ClientSecret | None (default: None)
        This client's private randomness, which draws the defenses' noise (a stream per round
        and purpose); ``None``: :meth:`ClientSecret.from_context` (the node config's
        ``client-secret``, or a secret kept in ``context.state``). Order ``train_loader``'s
        batches from it too (``secret.seed("shuffle", server_round)``): a batch order the server
        can derive links every release of an example.
    keep_client_head : bool | None (default: None)
        Label-private split: keep the client head on this node and never send it (it is kept in
        ``context.state`` between rounds, first drawn from ``secret``, and trained on this
        client's data alone: a personalised head). Whoever aggregates the client heads can run
        one on the server half's outputs and label the private examples, so this is what keeps
        the labels from the split server's process. ``None``: keep it when the message carries
        no client head (``SplitFed(client_heads="local")``), send it back when it carries one.
    """
    try:
        return _train(
            msg,
            context,
            split=split,
            train_loader=train_loader,
            optimizer=optimizer,
            local_epochs=local_epochs,
            reset_optimizer=reset_optimizer,
            loss_fn=loss_fn,
            privacy=privacy,
            batch=batch,
            metrics=metrics,
            secret=secret,
            keep_client_head=keep_client_head,
        )
    except Exception as err:  # becomes the reply's error, with its reason
        return _error_reply(msg, err)


def _train(
    msg: Message,
    context: Context,
    *,
    split: SplitModel,
    train_loader: Iterable[Any],
    optimizer: OptimizerConfig,
    local_epochs: int,
    reset_optimizer: bool,
    loss_fn: LossFn | None,
    privacy: PrivacyConfig | None,
    batch: Unpack | None,
    metrics: Mapping[str, MetricValue] | None,
    secret: ClientSecret | None,
    keep_client_head: bool | None,
) -> Message:
    ticket = _ticket(msg, split, expected_mode=Mode.TRAIN)
    secret = secret if secret is not None else ClientSecret.from_context(context)
    local_loss = ticket.variant == Variant.LOCAL_LOSS
    if privacy is not None:
        privacy.validate(
            label_private=split.label_private,
            client_half=split.client_half,
            server_loss_reduction=ticket.server_loss_reduction,
            local_loss=local_loss,
        )
    batch_size = getattr(train_loader, "batch_size", None)
    if ticket.max_batch_size and batch_size and batch_size > ticket.max_batch_size:
        raise ValueError(
            f"the loader's batch_size {batch_size} is more than the split server accepts "
            f"({ticket.max_batch_size} examples, its max_batch_size): use smaller batches"
        )
    arrays = _single_array_record(msg)
    local_head = _keeps_head(keep_client_head, split, arrays)
    if ticket.resume_local and STATE_CLIENT_HALF_KEY in context.state.array_records:
        arrays = context.state.array_records[STATE_CLIENT_HALF_KEY]
    _load_client_parts(split, arrays, context, local_head=local_head, secret=secret)
    torch_optimizer = optimizer.build(split.client_parameters())
    saved = context.state.config_records.get(STATE_OPTIMIZER_KEY)
    if saved is not None and not reset_optimizer:
        load_optimizer_state(torch_optimizer, saved["state"])  # type: ignore[arg-type]

    with (
        GrpcDataPlane.from_ticket(ticket, node_id=msg.metadata.dst_node_id) as data_plane,
        (privacy or PrivacyConfig()).training(
            split,
            torch_optimizer,
            batch_size=getattr(train_loader, "batch_size", None),
            generator=secret.generator("dp-sgd-noise", ticket.server_round),
        ) as (trained, step_optimizer),
    ):
        stats: TrainStats
        if local_loss:
            stats = run_local_loss_epochs(
                split=trained,
                data_plane=data_plane,
                train_loader=train_loader,
                optimizer=step_optimizer,
                local_epochs=local_epochs,
                send_every=ticket.send_every,
                proximal_mu=ticket.proximal_mu,
                loss_fn=loss_fn,
                privacy=privacy,
                generator=secret.generator("noise", ticket.server_round),
                batch=batch,
            )
        else:
            stats = run_local_epochs(
                split=trained,
                data_plane=data_plane,
                train_loader=train_loader,
                optimizer=step_optimizer,
                local_epochs=local_epochs,
                proximal_mu=ticket.proximal_mu,
                loss_fn=loss_fn,
                privacy=privacy,
                generator=secret.generator("noise", ticket.server_round),
                batch=batch,
            )

    reply_metrics = MetricRecord(
        {
            **stats.metrics(),
            "peak-rss-mb": peak_rss_mb(),
            **_epsilons(context, privacy, local_epochs),
        }
    )
    for key, value in (metrics or {}).items():
        reply_metrics[key] = value
    updated = ArrayRecord(split.client_state_dict())
    if local_head:
        assert split.client_head is not None  # _keeps_head checked it
        context.state[STATE_CLIENT_HEAD_KEY] = ArrayRecord(split.client_head.state_dict())
        updated = _without_head(updated, split)
    if not reset_optimizer:
        context.state[STATE_OPTIMIZER_KEY] = ConfigRecord(
            {"state": save_optimizer_state(torch_optimizer)}
        )
    if not ticket.send_client_half:
        context.state[STATE_CLIENT_HALF_KEY] = updated
    elif STATE_CLIENT_HALF_KEY in context.state.array_records:
        del context.state[STATE_CLIENT_HALF_KEY]
    reply_arrays = updated if ticket.send_client_half else ArrayRecord()
    return Message(RecordDict({"arrays": reply_arrays, "metrics": reply_metrics}), reply_to=msg)


def evaluate_client_half(
    msg: Message,
    context: Context,
    *,
    split: SplitModel,
    loader: Iterable[Any],
    loss_fn: LossFn | None = None,
    batch: Unpack | None = None,
    metrics: Mapping[str, MetricValue] | None = None,
    keep_client_head: bool | None = None,
) -> Message:
    """Handle one SplitFed ``evaluate`` message: evaluate the merged model on local data.

    Call it from a ``ClientApp``'s ``@app.evaluate()`` handler. The client's parts are loaded
    from the message and run in eval mode; the split server runs its half in eval mode too, and
    nothing is trained. In the label-private split the labels and the loss stay here. The reply
    holds one ``MetricRecord`` (``num-examples``, ``eval-loss``, ``eval-accuracy`` and your
    ``metrics``), which the strategy's aggregator aggregates.

    Parameters
    ----------
    msg : Message
        The ``evaluate`` message from a SplitFed strategy.
    context : Context
        This node's context.
    split : SplitModel
        The client's parts, as for :func:`train_client_half`.
    loader : Iterable
        This client's evaluation batches.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The label-private split: the client head's loss; ``None`` means cross-entropy.
    batch : BatchSpec | Callable | None (default: None)
        Which entries of a batch are the inputs and which the labels.
    metrics : Mapping[str, int | float] | None (default: None)
        Metrics of your own, added to the reply's ``MetricRecord``.
    keep_client_head : bool | None (default: None)
        As for :func:`train_client_half`: evaluate with the client head this node kept (which it
        needs to have trained once); ``None``: when the message carries no client head.
    """
    try:
        return _evaluate(
            msg,
            context,
            split=split,
            loader=loader,
            loss_fn=loss_fn,
            batch=batch,
            metrics=metrics,
            keep_client_head=keep_client_head,
        )
    except Exception as err:  # becomes the reply's error, with its reason
        return _error_reply(msg, err)


def _evaluate(
    msg: Message,
    context: Context,
    *,
    split: SplitModel,
    loader: Iterable[Any],
    loss_fn: LossFn | None,
    batch: Unpack | None,
    metrics: Mapping[str, MetricValue] | None,
    keep_client_head: bool | None,
) -> Message:
    ticket = _ticket(msg, split, expected_mode=Mode.EVALUATE)
    arrays = _single_array_record(msg)
    local_head = _keeps_head(keep_client_head, split, arrays)
    _load_client_parts(split, arrays, context, local_head=local_head, secret=None)
    with GrpcDataPlane.from_ticket(ticket, node_id=msg.metadata.dst_node_id) as data_plane:
        stats = evaluate_locally(
            split=split, data_plane=data_plane, loader=loader, loss_fn=loss_fn, batch=batch
        )
    reply_metrics = MetricRecord({**stats.metrics(), **(metrics or {})})
    return Message(RecordDict({"metrics": reply_metrics}), reply_to=msg)


def _error_reply(msg: Message, err: Exception) -> Message:
    """Flower's error reply for ``err``; its traceback is logged once per reason per process."""
    reason = f"{type(err).__name__}: {err}"
    node = msg.metadata.dst_node_id
    if reason in _LOGGED_REASONS:
        logger.error("SplitFed client (node %s) failed again: %s", node, reason)
    else:
        if len(_LOGGED_REASONS) < _MAX_LOGGED_REASONS:
            _LOGGED_REASONS.add(reason)
        logger.error(
            "SplitFed client (node %s) failed on a %s message; it replies with the error, which "
            "the strategy logs and counts",
            node,
            msg.metadata.message_type,
            exc_info=err,
        )
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _ticket(msg: Message, split: SplitModel, *, expected_mode: str) -> DataPlaneTicket:
    ticket = DataPlaneTicket.from_message(msg)
    if ticket.mode != expected_mode:
        raise ValueError(
            f"the message's ticket is for {ticket.mode!r}, but it reached the {expected_mode} "
            "handler; call train_client_half from @app.train() and evaluate_client_half from "
            "@app.evaluate()"
        )
    if ticket.label_private != split.label_private:
        kinds = {True: "label-private", False: "plain"}
        raise ValueError(
            f"the split server runs the {kinds[ticket.label_private]} split and this client "
            f"the {kinds[split.label_private]} one: cut the model the same way on both sides "
            "(a server_cut, and so a client head, on both or on neither)"
        )
    variant = Variant.validate(ticket.variant)
    if variant == Variant.LOCAL_LOSS and split.aux_head is None:
        raise ValueError(
            "the split server runs local-loss training and this client's split has no "
            "auxiliary head: give the client split.with_aux_head(...) built as the ServerApp "
            "builds its split"
        )
    if variant != Variant.LOCAL_LOSS and split.aux_head is not None:
        raise ValueError(
            f"the split server runs {Variant.describe(variant)} and this client's split has an "
            "auxiliary head, which only local-loss training uses: give the client the split "
            "without with_aux_head(...), or run the strategy with variant='local-loss'"
        )
    if ticket.send_every < 1:
        raise ValueError(f"the ticket's send-every must be at least 1; got {ticket.send_every}")
    return ticket


def _epsilons(
    context: Context, privacy: PrivacyConfig | None, local_epochs: int
) -> dict[str, float]:
    """The privacy spent by this node so far, counting this round's epochs."""
    if privacy is None or not privacy.enabled:
        return {}
    # Each example is sent once per local epoch and takes part in one DP-SGD step per epoch.
    seen = context.state.config_records.get(STATE_PRIVACY_KEY)
    epochs = local_epochs + (int(seen["epochs"]) if seen is not None else 0)  # type: ignore[arg-type]
    context.state[STATE_PRIVACY_KEY] = ConfigRecord({"epochs": epochs})
    return privacy.epsilons(releases=epochs, dp_steps=epochs)


def _keeps_head(keep_client_head: bool | None, split: SplitModel, arrays: ArrayRecord) -> bool:
    """Whether the client head stays on this node: asked for, or absent from the message."""
    if split.client_head is None:
        if keep_client_head:
            raise ValueError(
                "keep_client_head=True applies to the label-private split, and this split has "
                "no client head: cut the model with a server_cut or leave keep_client_head unset"
            )
        return False
    if keep_client_head is None:
        return not set(split.client_head.state_dict()) & set(arrays)
    return keep_client_head


def _without_head(arrays: ArrayRecord, split: SplitModel) -> ArrayRecord:
    head_keys = set(split.client_head.state_dict()) if split.client_head is not None else set()
    return ArrayRecord({key: arrays[key] for key in arrays if key not in head_keys})


def _load_client_parts(
    split: SplitModel,
    arrays: ArrayRecord,
    context: Context,
    *,
    local_head: bool,
    secret: ClientSecret | None,
) -> None:
    """Load the message's client parts; a head kept on this node comes from ``context.state``
    (drawn from ``secret`` the first time), never from the message."""
    if not local_head:
        split.load_client_state_dict(arrays.to_torch_state_dict())
        return
    head = split.client_head
    assert head is not None  # _keeps_head checked it
    state = _without_head(arrays, split).to_torch_state_dict()
    if len(state) < len(arrays):
        logger.warning(
            "the message carries a client head; this client keeps its own and ignores it"
        )
    kept = context.state.array_records.get(STATE_CLIENT_HEAD_KEY)
    if kept is not None:
        state.update(kept.to_torch_state_dict())
    elif secret is None:
        raise ValueError(
            "this client keeps its client head on the node and has not trained one yet, so it "
            "cannot evaluate: select it for training first (the head is created in its first "
            "training round)"
        )
    else:
        _initialise_head(head, secret.seed("client-head"))
        state.update(head.state_dict())
    split.load_client_state_dict(state)


def _initialise_head(head: torch.nn.Module, seed: int) -> None:
    """Give a client head kept on the node its first weights, drawn from the client's secret:
    the server, which built the model, does not know them."""
    with seeded(seed), torch.no_grad():
        for module in head.modules():
            owned = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if not owned:
                continue
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                raise ValueError(
                    f"the client head's {type(module).__name__} has no reset_parameters(), so "
                    "its first weights cannot be drawn on the client: give it one, or put "
                    f"initial weights in context.state[{STATE_CLIENT_HEAD_KEY!r}] "
                    "(an ArrayRecord of the head's state_dict)"
                )
            reset()


def _single_array_record(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if len(records) != 1:
        raise ValueError(
            f"the {msg.metadata.message_type} message should carry exactly one ArrayRecord (the "
            f"global client parts); it carries {len(records)}: {sorted(records)}"
        )
    return next(iter(records.values()))
