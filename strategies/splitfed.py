"""SplitFed as a Flower strategy."""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore import log
from torch import nn

from splitfed.checkpoint import CheckpointConfig, CheckpointError, load_checkpoint, save_checkpoint
from splitfed.config import OptimizerConfig, ServerCopies, Variant
from splitfed.cut import SplitModel
from splitfed.monitor import LeakageEstimate, LeakageMonitor
from splitfed.protocol import TICKET_KEY, DataPlaneTicket, Mode
from splitfed.resources import peak_rss_mb
from splitfed.server import RoundStats, SplitServer
from splitfed.server_half import LossFn, make_trainer
from splitfed.tls import TLSCredentials
from splitfed.wire import COMPRESSIONS, TensorSpec

from .failures import FailureLog

__all__ = ["CLIENT_HEADS", "SplitFed", "SplitFedResult"]

CHECKPOINT_FORMAT = 2
CLIENT_HEADS = ("shared", "local")
"""Label-private split: what happens to the client heads (``SplitFed(client_heads=...)``)."""


@dataclass
class SplitFedResult(Result):
    """Flower's :class:`Result` (``arrays`` is the global client half), plus the server half and
    what crossed the data plane in each round."""

    server_half_arrays: ArrayRecord = field(default_factory=ArrayRecord)
    round_metrics: dict[int, MetricRecord] = field(default_factory=dict)


class SplitFed(Strategy):
    """SplitFed: split learning with federated averaging of the client halves.

    Flower carries one ``train`` (and ``evaluate``) message per selected client per round; the
    split server, which this strategy starts for the length of :meth:`start`, carries every
    batch. Node selection, the aggregation of client halves and of evaluation metrics are
    delegated to ``aggregator``, an ordinary Flower strategy, so FedAvg, FedProx, FedAdam, Krum,
    ... work unchanged on the client halves, and its ``fraction_evaluate`` and
    ``min_evaluate_nodes`` decide federated evaluation.

    Parameters
    ----------
    split : SplitModel
        The cut model, from :func:`splitfed.split_model` or :func:`splitfed.join_halves`. Its
        server half is copied: the strategy trains the copy. A split with a client head runs the
        label-private (U-shaped) split: labels and the loss stay with the clients, whose
        ``ArrayRecord`` then holds the client half and the client head, merged together. For
        ``variant="local-loss"`` it carries an auxiliary head
        (:meth:`~splitfed.SplitModel.with_aux_head`), which travels and is merged with the
        client half, and which the clients' split must carry too.
    variant : str (default: "v1")
        ``"v1"`` (SFLV1: one server-half copy per client, averaged with the client halves),
        ``"v2"`` (SFLV2: one server half, updated by each client's batches in arrival order) or
        ``"local-loss"`` (each client trains its half on its auxiliary head's loss and streams
        activations and labels to the split server without waiting; no gradient comes back).
    server_copies : str | None (default: None)
        ``variant="local-loss"`` only: ``"shared"`` (what ``None`` means; one server half
        trained on every client's batches in arrival order, as SFLV2) or ``"per-client"`` (one
        copy per client, averaged with FedAvg when the round merges, as SFLV1).
    send_every : int (default: 1)
        ``variant="local-loss"`` only: each client sends every this many batches to the split
        server (CSE-FSL's ``k``); the others train the client alone. A client's ``send_every``
        batches must fit in ``idle_timeout``.
    server_optimizer : OptimizerConfig | None (default: None)
        The server-half optimizer; ``None`` means ``OptimizerConfig()`` (SGD, lr 0.05). It keeps
        its state across batches and rounds.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The training loss on the server half's output, averaged over the batch; ``None`` means
        cross-entropy. Not used by the label-private split, whose loss is the clients'. (The
        auxiliary head's loss is the clients' too: ``train_client_half(loss_fn=...)``.)
    aggregator : Strategy | None (default: None)
        Selects clients and merges client halves; aggregates federated evaluation metrics.
        ``None`` means ``FedAvg()``. The SFLV1 server-half copies are always merged with FedAvg
        weighted by examples, whatever ``aggregator`` does with the client halves. Its
        ``fraction_evaluate=0.0`` turns federated evaluation off.
    merge_every : int (default: 1)
        Merge client halves (and SFLV1 server-half copies) every this many rounds, and after
        the last round. Between merges each client trains on from its own client half (from the
        global one if it has none, e.g. when it was not selected in the previous round).
    split_server_address : str (default: "127.0.0.1:0")
        Where the split server listens; port 0 picks a free port.
    advertised_address : str | None (default: None)
        The split server address sent to clients, when it differs from the bound one.
    device : str (default: "cpu")
        Where the server half runs.
    max_streams : int (default: 64)
        Most clients streaming at once; more wait for a free stream (see
        :class:`splitfed.SplitServer`).
    max_batch_size : int (default: 4096)
        Most examples in one batch; it bounds the largest frame the split server reads.
    labels : TensorSpec | None (default: None)
        What one example's labels are; ``None``: one int64 class index (cross-entropy).
    idle_timeout, hold_timeout : float (default: 120.0, 60.0)
        Seconds a client's stream may be silent before it is closed, and (label-private split)
        a batch may wait for its output gradient before it is dropped.
    tls : TLSCredentials | None (default: None)
        The split server's TLS certificate and CA. Clients receive the CA inside their
        message and verify the split server with it. Required unless ``insecure=True``.
    insecure : bool (default: False)
        Serve the data plane in plaintext, for a single machine or a private network only;
        logs a warning.
    min_completed_clients : int | None (default: None)
        A round merges only if at least this many selected clients finished it; otherwise it
        is dropped and both halves stay as they were before it (SFLV2's server half is rolled
        back). ``None`` means the aggregator's ``min_train_nodes`` (1 if it has none).
    max_failed_rounds : int (default: 3)
        Stop the run with :class:`SplitFedRunError`, naming the clients' failure reasons, after
        this many consecutive rounds in which no client finished. The ServerApp then ends with
        an error instead of a completed run that learned nothing.
    batched : bool (default: False)
        Run the steps of concurrent clients as one vectorised pass over their server-half
        copies (:class:`splitfed.batched.BatchedSFLV1Trainer`); for a server half on an
        accelerator (on a CPU it is slower). Only with one copy per client: ``variant="v1"``,
        or local-loss with ``server_copies="per-client"``.
    server_threads : int | None (default: None)
        Torch threads per server-half operation, set for this process when the split server
        starts (see :class:`splitfed.SplitServer`'s ``intra_op_threads``). ``None`` leaves
        torch's setting; 1 suits SFLV1 on a CPU with several concurrent clients.
    data_plane_compression : str (default: "none")
        How activations and the gradients returned for them travel: ``"none"`` (exact),
        ``"fp16"``, ``"bf16"`` (half the bytes), ``"int8-row"`` or ``"int8-tensor"`` (a quarter,
        with a float32 scale per example or per batch). Round metrics count wire bytes.
    checkpoint : CheckpointConfig | None (default: None)
        Write a checkpoint after every merged round and resume from one (see
        :class:`splitfed.CheckpointConfig`).
    client_heads : str (default: "shared")
        Label-private split only. ``"shared"``: the client heads travel with the client halves
        and are merged by ``aggregator`` in this process, the split server's, which can then run
        a head on the server half's outputs and label the private examples (logged as a
        warning). ``"local"``: each client keeps its head and trains it on its own data alone (a
        personalised head); messages, replies and the global arrays hold the client half only,
        this process never holds a head, and accuracy is measured on the clients (federated
        evaluation): :meth:`global_model` has no head to assemble.
    leakage_monitor : LeakageMonitor | None (default: None)
        After each merged round (every ``leakage_monitor.every``), estimate what this process
        could reconstruct of the clients' inputs from the merged client half, and in the
        label-private split what it could recover of their labels through the server half and
        the client head it holds (see :class:`splitfed.LeakageMonitor`); the estimate joins the
        round's metrics
        (``leakage-`` keys), and with ``action="stop"`` a round above its threshold ends the
        run after that round's evaluation.
    """

    def __init__(
        self,
        *,
        split: SplitModel,
        variant: str = Variant.V1,
        server_copies: str | None = None,
        send_every: int = 1,
        server_optimizer: OptimizerConfig | None = None,
        loss_fn: LossFn | None = None,
        aggregator: Strategy | None = None,
        merge_every: int = 1,
        split_server_address: str = "127.0.0.1:0",
        advertised_address: str | None = None,
        device: str = "cpu",
        max_streams: int = 64,
        max_batch_size: int = 4096,
        labels: TensorSpec | None = None,
        idle_timeout: float = 120.0,
        hold_timeout: float = 60.0,
        tls: TLSCredentials | None = None,
        insecure: bool = False,
        min_completed_clients: int | None = None,
        max_failed_rounds: int = 3,
        data_plane_compression: str = "none",
        server_threads: int | None = None,
        batched: bool = False,
        checkpoint: CheckpointConfig | None = None,
        client_heads: str = "shared",
        leakage_monitor: LeakageMonitor | None = None,
    ) -> None:
        if data_plane_compression not in COMPRESSIONS:
            raise ValueError(
                f"data_plane_compression={data_plane_compression!r} is not known; use one of "
                f"{', '.join(repr(c) for c in COMPRESSIONS)}"
            )
        if merge_every < 1:
            raise ValueError(f"merge_every must be at least 1; got {merge_every}")
        if min_completed_clients is not None and min_completed_clients < 1:
            raise ValueError(
                f"min_completed_clients must be at least 1 or None; got {min_completed_clients}"
            )
        if max_failed_rounds < 1:
            raise ValueError(f"max_failed_rounds must be at least 1; got {max_failed_rounds}")
        if client_heads not in CLIENT_HEADS:
            raise ValueError(f"client_heads={client_heads!r} is not known; use 'shared' or 'local'")
        if client_heads == "local" and not split.label_private:
            raise ValueError(
                "client_heads='local' applies to the label-private split, and this split has no "
                "client head: cut the model with a server_cut, or leave client_heads='shared'"
            )
        if split.label_private and client_heads == "shared":
            log(
                WARNING,
                "PRIVACY: label-private split with client_heads='shared': the client heads reach "
                "the aggregator in this process, the split server's, which can run a head on the "
                "server half's outputs and label the private examples. Pass "
                "client_heads='local' to keep each head on its client",
            )
        if split.label_private and loss_fn is not None:
            raise ValueError(
                "in the label-private split the loss is computed by the client head: pass "
                "loss_fn to train_client_half on the clients, not to the strategy"
            )
        self.variant = Variant.validate(variant)
        _check_variant(self.variant, split, server_copies=server_copies, send_every=send_every)
        self.server_copies = (
            ServerCopies.validate(server_copies or ServerCopies.SHARED)
            if self.variant == Variant.LOCAL_LOSS
            else None
        )
        self.send_every = send_every
        self.data_plane_compression = data_plane_compression
        self.label_private = split.label_private
        self.server_loss_reduction = str(
            getattr(loss_fn, "reduction", "unknown") if loss_fn is not None else "mean"
        )
        self.merge_every = merge_every
        self.max_failed_rounds = max_failed_rounds
        self.checkpoint = checkpoint
        self.aggregator = aggregator if aggregator is not None else FedAvg()
        self.min_completed_clients = (
            min_completed_clients
            if min_completed_clients is not None
            else int(getattr(self.aggregator, "min_train_nodes", 1))
        )
        self.client_heads = client_heads
        # The strategy's own copy of the model: the trainer owns the server half; the client
        # parts and another server half assemble the global model for evaluation. With heads
        # kept on the clients it holds no head, not even the initial one.
        self._split = (
            dataclasses.replace(split, client_head=None, model=None)
            if client_heads == "local"
            else split
        )
        self._split = copy.deepcopy(self._split)
        self.trainer = make_trainer(
            self.variant,
            server_copies=self.server_copies,
            batched=batched,
            server_half=copy.deepcopy(split.server_half),
            optimizer=server_optimizer or OptimizerConfig(),
            loss_fn=loss_fn,
            device=device,
        )
        self.client_half_keys = tuple(self._split.client_state_dict())
        self.split_server = SplitServer.for_split(
            split,
            trainer=self.trainer,
            address=split_server_address,
            advertised_address=advertised_address,
            max_streams=max_streams,
            max_batch_size=max_batch_size,
            labels=labels,
            idle_timeout=idle_timeout,
            hold_timeout=hold_timeout,
            tls=tls,
            insecure=insecure,
            local_loss=self.variant == Variant.LOCAL_LOSS,
            intra_op_threads=server_threads,
        )
        self.leakage_monitor = leakage_monitor
        if leakage_monitor is not None:
            leakage_monitor.bind(
                self._split.client_half,
                activation_shape=split.activation_shape,
                server_half=self._split.server_half if self.label_private else None,
            )
        self._root_certificates = tls.root_certificates.decode() if tls else ""
        self._num_rounds = 0
        self._round_started = 0.0
        self._round_metrics: dict[int, MetricRecord] = {}
        self._sync_bytes = 0
        self._global_dtypes: dict[str, np.dtype[Any]] = {}
        self._selected: list[int] = []
        self._evaluating: list[int] = []
        self._failures = FailureLog()

    # -- Strategy API ---------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the SplitFed settings, then the aggregator's."""
        log(INFO, "\t├──> SplitFed settings:")
        log(INFO, "\t│\t├── Variant: %s", Variant.describe(self.variant, self.server_copies))
        if self.variant == Variant.LOCAL_LOSS:
            log(INFO, "\t│\t├── Send every: %d batch(es)", self.send_every)
        log(INFO, "\t│\t├── Label-private (U-shaped): %s", self.label_private)
        if self.label_private:
            log(INFO, "\t│\t├── Client heads: %s", self.client_heads)
        log(INFO, "\t│\t├── Split server: %s", self.split_server.address or "(not started)")
        log(
            INFO, "\t│\t├── Data-plane TLS: %s", "on" if self.split_server.tls else "OFF (insecure)"
        )
        log(INFO, "\t│\t├── Server optimizer: %s", self.trainer.optimizer_config)
        log(INFO, "\t│\t├── Data-plane compression: %s", self.data_plane_compression)
        log(INFO, "\t│\t├── Merge every: %d round(s)", self.merge_every)
        monitor = self.leakage_monitor
        log(
            INFO,
            "\t│\t├── Leakage monitor: %s",
            "off"
            if monitor is None
            else f"every {monitor.every} round(s), threshold "
            f"{'none' if monitor.threshold is None else monitor.threshold} ({monitor.action})",
        )
        log(INFO, "\t│\t└── Client-half aggregator: %s", type(self.aggregator).__name__)
        self.aggregator.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select clients through the aggregator and hand each its data-plane ticket."""
        self._round_started = time.perf_counter()
        messages = list(self.aggregator.configure_train(server_round, arrays, config, grid))
        self._selected = [msg.metadata.dst_node_id for msg in messages]
        self._sync_bytes = _array_bytes(arrays) * len(messages)
        return self._with_tickets(
            server_round,
            messages,
            mode=Mode.TRAIN,
            resume_local=(server_round - 1) % self.merge_every != 0,
            send_client_half=self._merges_after(server_round),
            proximal_mu=float(getattr(self.aggregator, "proximal_mu", 0.0)),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge client halves through the aggregator, and SFLV1 server halves with FedAvg.

        Clients that failed or never replied are logged with the reason and left out; a round
        that too few clients finished is dropped (see ``min_completed_clients``).
        """
        replies = list(replies)
        stats = self.split_server.close_round()
        completed = self._failures.record(server_round, "train", self._selected, replies)
        completed = self._without_unexpected_parts(server_round, completed)
        merge = self._merges_after(server_round)
        dropped = merge and len(completed) < self.min_completed_clients
        arrays: ArrayRecord | None
        metrics: MetricRecord | None
        if dropped:
            log(
                WARNING,
                "[SplitFed] round %d dropped: %d of %d selected clients finished, fewer than "
                "the %d required; both halves stay as they were before the round",
                server_round,
                len(completed),
                len(self._selected),
                self.min_completed_clients,
            )
            self.trainer.discard_round()
            arrays, metrics = None, None
        elif merge:
            arrays, metrics = self.aggregator.aggregate_train(server_round, completed)
            if arrays is not None:
                arrays = _cast_like(arrays, self._global_dtypes)
            # Weighted by the examples the split server itself counted for each client.
            self._merge_server_halves(
                {
                    node_id: stats.examples_by_node.get(node_id, 0)
                    for node_id in (msg.metadata.src_node_id for msg in completed)
                }
            )
        else:
            contents = [msg.content for msg in completed]
            arrays = None
            metrics = aggregate_metricrecords(contents, "num-examples") if contents else None
        self._sync_bytes += sum(
            _array_bytes(record)
            for msg in completed
            for record in msg.content.array_records.values()
        )
        self._record_round(
            server_round,
            stats,
            clients=len(self._selected),
            failed=len(self._selected) - len(completed),
            merged=merge and not dropped,
            dropped=dropped,
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select clients through the aggregator (its ``fraction_evaluate``) to evaluate the
        merged model on their own data, through the split server in eval mode."""
        messages = list(self.aggregator.configure_evaluate(server_round, arrays, config, grid))
        self._evaluating = [msg.metadata.dst_node_id for msg in messages]
        if not messages:
            return []
        return self._with_tickets(server_round, messages, mode=Mode.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the clients' evaluation metrics with the aggregator's own function."""
        replies = list(replies)
        if not self._evaluating:
            return None
        self.split_server.close_round()
        completed = self._failures.record(server_round, "evaluate", self._evaluating, replies)
        if not completed:
            return None
        return self.aggregator.aggregate_evaluate(server_round, completed)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> SplitFedResult:
        """Run SplitFed for ``num_rounds`` rounds; the same contract as Flower's
        :meth:`Strategy.start`.

        The split server runs for the length of this call. ``initial_arrays`` is the initial
        client side (``ArrayRecord(split.client_state_dict())``). ``evaluate_fn(server_round,
        arrays)``, if given, evaluates centrally before the first round and after each, on the
        merged client half; :meth:`global_model` assembles the whole model from it with the
        current server half. ``timeout`` is the most seconds a round's training (and its
        evaluation) waits for clients; those that have not replied by then are left out.

        Each round trains, then evaluates on the clients the aggregator selects (Flower's
        federated evaluation), then calls ``evaluate_fn``; a run with a ``checkpoint`` resumes
        after the round its checkpoint holds.
        """
        self._check_client_half(initial_arrays)
        self._num_rounds = num_rounds
        self._round_metrics = {}
        self._failures = FailureLog()
        self._global_dtypes = {key: array.numpy().dtype for key, array in initial_arrays.items()}
        train_config = train_config if train_config is not None else ConfigRecord()
        evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
        result = SplitFedResult(arrays=initial_arrays)
        first_round = self._resume(result) + 1

        log(INFO, "Starting %s strategy:", type(self).__name__)
        with self.split_server:
            self.summary()
            if first_round == 1:
                self._evaluate_centrally(0, result, evaluate_fn)
            for server_round in range(first_round, num_rounds + 1):
                log(INFO, "")
                log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
                self._train_round(grid, server_round, result, train_config, timeout)
                leakage = self._monitor_leakage(server_round, result)
                self._evaluate_round(grid, server_round, result, evaluate_config, timeout)
                self._evaluate_centrally(server_round, result, evaluate_fn)
                result.round_metrics[server_round] = self._round_metrics[server_round]
                self._save(server_round, result)
                self._failures.check(server_round, self.max_failed_rounds)
                if self.leakage_monitor is not None and self.leakage_monitor.stops(leakage):
                    log(
                        ERROR,
                        "[SplitFed] run stopped after round %d of %d: leakage above the "
                        "monitor's threshold",
                        server_round,
                        num_rounds,
                    )
                    break
        result.server_half_arrays = self.server_half_arrays()
        return result

    # -- the steps of a round -------------------------------------------------------------------

    def _train_round(
        self,
        grid: Grid,
        server_round: int,
        result: SplitFedResult,
        config: ConfigRecord,
        timeout: float,
    ) -> None:
        messages = self.configure_train(server_round, result.arrays, config, grid)
        replies = send_and_receive(grid, messages, timeout=timeout)
        arrays, metrics = self.aggregate_train(server_round, replies)
        if arrays is not None:
            result.arrays = arrays
        if metrics is not None:
            result.train_metrics_clientapp[server_round] = metrics

    def _monitor_leakage(self, server_round: int, result: SplitFedResult) -> LeakageEstimate | None:
        monitor = self.leakage_monitor
        metrics = self._round_metrics[server_round]
        if (
            monitor is None
            or not metrics["merged"]
            or not monitor.due(server_round, self._num_rounds)
        ):
            return None
        self._load_global(result.arrays)
        estimate = monitor.measure(
            server_round,
            self._split.client_half,
            server_half=self._split.server_half if self.label_private else None,
            client_head=self._split.client_head,
        )
        for key, value in estimate.metrics().items():
            metrics[key] = value
        metrics["leakage-exceeded"] = int(estimate.exceeded)
        return estimate

    def _evaluate_round(
        self,
        grid: Grid,
        server_round: int,
        result: SplitFedResult,
        config: ConfigRecord,
        timeout: float,
    ) -> None:
        messages = list(self.configure_evaluate(server_round, result.arrays, config, grid))
        replies = send_and_receive(grid, messages, timeout=timeout) if messages else []
        metrics = self.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = metrics
            log(INFO, "[SplitFed] round %d federated evaluation: %s", server_round, metrics)

    def _evaluate_centrally(
        self,
        server_round: int,
        result: SplitFedResult,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> None:
        metrics = evaluate_fn(server_round, result.arrays) if evaluate_fn else None
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics
        self._log_round(server_round, metrics)

    # -- the global model -----------------------------------------------------------------------

    def server_half_arrays(self) -> ArrayRecord:
        """The global server half, as an ``ArrayRecord``."""
        return ArrayRecord(self.trainer.server_half.state_dict())

    def global_model(self, arrays: ArrayRecord) -> nn.Module:
        """The whole model: the client side from ``arrays`` (e.g. what ``evaluate_fn`` gets) and
        the current global server half.

        It is the strategy's own copy, loaded anew by each call; use it for central evaluation
        or to save the model. Its parameters are not the ones being trained.
        """
        if self.client_heads == "local":
            raise ValueError(
                "the client heads stay on the clients (client_heads='local'), so there is no "
                "whole model here to evaluate centrally: pass no evaluate_fn and measure accuracy "
                "with federated evaluation (the aggregator's fraction_evaluate > 0)"
            )
        self._load_global(arrays)
        return self._split.full_model()

    def _load_global(self, arrays: ArrayRecord) -> None:
        """Load the strategy's own copy of the split: the client side (and client head, where
        the aggregator holds it) from ``arrays``, the global server half from the trainer."""
        self._split.load_client_state_dict(arrays.to_torch_state_dict())
        self._split.server_half.load_state_dict(self.trainer.server_half.state_dict())

    # -- helpers --------------------------------------------------------------------------------

    def _with_tickets(
        self, server_round: int, messages: list[Message], *, mode: str, **ticket: Any
    ) -> list[Message]:
        """Open the split server's round for ``messages``' nodes and give each its ticket."""
        tokens = self.split_server.open_round(
            server_round, [msg.metadata.dst_node_id for msg in messages], mode=mode
        )
        tickets = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            record = DataPlaneTicket(
                address=str(self.split_server.address),
                token=tokens[node_id],
                server_round=server_round,
                mode=mode,
                root_certificates=self._root_certificates,
                label_private=self.label_private,
                server_loss_reduction=self.server_loss_reduction,
                compression=self.data_plane_compression,
                max_batch_size=self.split_server.max_batch_size,
                variant=self.variant,
                send_every=self.send_every,
                **ticket,
            ).to_record()
            # The aggregator may share one RecordDict among its messages: give each its own.
            content = RecordDict({**msg.content, TICKET_KEY: record})
            tickets.append(
                Message(content, dst_node_id=node_id, message_type=msg.metadata.message_type)
            )
        return tickets

    def _without_unexpected_parts(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Leave out replies whose arrays are not the client side this strategy merges (a client
        head where heads stay on the clients): they are not merged, and the global arrays never
        hold them."""
        expected = set(self.client_half_keys)
        kept = []
        for msg in replies:
            keys = {key for record in msg.content.array_records.values() for key in record}
            unexpected = sorted(keys - expected)
            if not unexpected:
                kept.append(msg)
                continue
            log(
                ERROR,
                "[SplitFed] round %d: node %s replied with arrays %s, which this strategy does "
                "not merge (client_heads=%r); its reply is left out. Give the client "
                "train_client_half(keep_client_head=True) and the same cut as the ServerApp",
                server_round,
                msg.metadata.src_node_id,
                unexpected,
                self.client_heads,
            )
        return kept

    def _merges_after(self, server_round: int) -> bool:
        return server_round % self.merge_every == 0 or server_round == self._num_rounds

    def _merge_server_halves(self, num_examples: dict[int, int]) -> None:
        copies = self.trainer.client_copies([n for n, w in num_examples.items() if w > 0])
        if not copies:
            return
        records = [
            RecordDict(
                {
                    "arrays": ArrayRecord(module.state_dict()),
                    "metrics": MetricRecord({"num-examples": num_examples[node_id]}),
                }
            )
            for node_id, module in copies.items()
        ]
        merged = aggregate_arrayrecords(records, "num-examples")
        reference = self.trainer.server_half.state_dict()
        dtypes = {key: tensor.numpy().dtype for key, tensor in reference.items()}
        self.trainer.load_merged(_cast_like(merged, dtypes).to_torch_state_dict())

    def _check_client_half(self, arrays: ArrayRecord) -> None:
        if set(arrays) != set(self.client_half_keys):
            raise ValueError(
                "initial_arrays do not match the client side of the split: expected keys "
                f"{list(self.client_half_keys)}, got {list(arrays)}. Pass "
                + (
                    "ArrayRecord(split.client_half.state_dict()): the client heads stay on the "
                    "clients (client_heads='local')"
                    if self.client_heads == "local"
                    else "ArrayRecord(split.client_state_dict())"
                )
            )

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self, server_round: int, result: SplitFedResult) -> None:
        if self.checkpoint is not None and self._round_metrics[server_round]["merged"]:
            save_checkpoint(self.checkpoint.path, self._checkpoint(server_round, result))

    def _checkpoint(self, server_round: int, result: SplitFedResult) -> dict[str, Any]:
        assert self.checkpoint is not None
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.checkpoint.fingerprint,
            "round": server_round,
            "client_half": result.arrays.to_torch_state_dict(),
            "trainer": self.trainer.state_dict(),
            "round_metrics": {r: dict(m) for r, m in result.round_metrics.items()},
            "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
            "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "federated_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        }
        if self.checkpoint.global_rng:
            numpy_state: Any = np.random.get_state()
            state["rng"] = {
                "python": random.getstate(),
                "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
                "torch": torch.get_rng_state(),
            }
        return state

    def _resume(self, result: SplitFedResult) -> int:
        """Restore the state a checkpoint holds, if there is one; return its round (0 if none)."""
        if self.checkpoint is None:
            return 0
        checkpoint = load_checkpoint(self.checkpoint.path)
        if checkpoint is None:
            return 0
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"the checkpoint has format {checkpoint.get('format')!r}, this version reads "
                f"{CHECKPOINT_FORMAT}; move it away to start the run afresh"
            )
        if checkpoint["fingerprint"] != self.checkpoint.fingerprint:
            raise CheckpointError(
                "the checkpoint belongs to another run configuration "
                f"({checkpoint['fingerprint']!r}, this run: {self.checkpoint.fingerprint!r}); "
                "resume with the same configuration, or write to another checkpoint path"
            )
        client_half = ArrayRecord(checkpoint["client_half"])
        self._check_client_half(client_half)
        result.arrays = client_half
        self.trainer.load_state_dict(checkpoint["trainer"])
        for target, key in (
            (result.round_metrics, "round_metrics"),
            (result.train_metrics_clientapp, "train_metrics"),
            (result.evaluate_metrics_serverapp, "evaluate_metrics"),
            (result.evaluate_metrics_clientapp, "federated_metrics"),
        ):
            target.update({r: MetricRecord(m) for r, m in checkpoint[key].items()})
        self._round_metrics.update(result.round_metrics)
        if self.checkpoint.global_rng and "rng" in checkpoint:
            rng = checkpoint["rng"]
            random.setstate(rng["python"])
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
            torch.set_rng_state(rng["torch"])
        server_round = int(checkpoint["round"])
        log(INFO, "[SplitFed] resuming after round %d from %s", server_round, self.checkpoint.path)
        return server_round

    # -- metrics and logs -----------------------------------------------------------------------

    def _record_round(
        self,
        server_round: int,
        stats: RoundStats,
        *,
        clients: int,
        failed: int,
        merged: bool,
        dropped: bool,
    ) -> None:
        self._round_metrics[server_round] = MetricRecord(
            {
                "data-plane-bytes": stats.data_plane_bytes,
                "data-plane-batches": stats.batches,
                "refused-batches": stats.refused_batches,
                "refused-streams": stats.refused_streams,
                "busy-refusals": stats.busy_refusals,
                "idle-streams-closed": stats.idle_streams_closed,
                "released-holds": stats.released_holds,
                "model-sync-bytes": self._sync_bytes,
                "clients": clients,
                "failed-clients": failed,
                "merged": int(merged),
                "dropped": int(dropped),
                "round-seconds": time.perf_counter() - self._round_started,
                "server-peak-rss-mb": peak_rss_mb(),
            }
        )

    def _log_round(self, server_round: int, metrics: MetricRecord | None) -> None:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in (metrics or {}).items() if isinstance(v, float)
        )
        round_metrics = self._round_metrics.get(server_round)
        if round_metrics is None:
            log(INFO, "[SplitFed] initial model: %s", shown or "(no evaluate_fn)")
            return
        log(
            INFO,
            "[SplitFed] round %d/%d: %s | data plane %.2f MB in %d batches, "
            "model sync %.2f MB | %.2f s",
            server_round,
            self._num_rounds,
            shown or "(no evaluate_fn)",
            float(round_metrics["data-plane-bytes"]) / 1e6,  # type: ignore[arg-type]
            round_metrics["data-plane-batches"],
            float(round_metrics["model-sync-bytes"]) / 1e6,  # type: ignore[arg-type]
            round_metrics["round-seconds"],
        )


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    first_pause: float = 0.005,
    longest_pause: float = 0.1,
) -> list[Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` seconds passed.

    Flower's ``Grid.send_and_receive`` waits a fixed pause between pulls (3 s on the deployment
    engine, 0.1 s in simulation), which a SplitFed round pays twice (training, evaluation). Here
    the pause starts at ``first_pause`` and grows by half each pull up to ``longest_pause``, and
    starts again from ``first_pause`` after a pull that brought replies (the clients of a round
    tend to finish together): a reply is seen soon after it arrives, and a long round costs the
    SuperLink ten pulls a second at most. Uses only the grid's public ``push_messages`` and
    ``pull_messages``.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    pause = first_pause / 1.5
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(msg.metadata.reply_to_message_id for msg in pulled)
        pause = first_pause if pulled else min(1.5 * pause, longest_pause)
        if not pending or time.monotonic() + pause > deadline:
            break
        time.sleep(pause)
    return replies


def _check_variant(
    variant: str, split: SplitModel, *, server_copies: str | None, send_every: int
) -> None:
    """Refuse a split or settings the variant cannot run, with the fix."""
    if variant != Variant.LOCAL_LOSS:
        problems = []
        if server_copies is not None:
            problems.append(
                f"server_copies applies to variant='local-loss' only ({Variant.describe(variant)} "
                "keeps its own server half); leave it unset"
            )
        if send_every != 1:
            problems.append(
                f"send_every={send_every} applies to variant='local-loss' only: "
                f"{Variant.describe(variant)} sends every batch; leave it at 1"
            )
        if split.aux_head is not None:
            problems.append(
                "the split has an auxiliary head, which only variant='local-loss' trains; pass "
                "the split without with_aux_head(...)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return
    if split.label_private:
        raise ValueError(
            "variant='local-loss' sends the labels to the split server, so it cannot run the "
            "label-private split: cut the model without server_cut, or use variant 'v1' or 'v2'"
        )
    if split.aux_head is None:
        raise ValueError(
            "variant='local-loss' trains each client half on an auxiliary head's loss: pass "
            "split=split.with_aux_head(num_classes=...) (or with_aux_head(my_head)), and give "
            "the clients the same"
        )
    if send_every < 1:
        raise ValueError(f"send_every must be at least 1; got {send_every}")


def _cast_like(arrays: ArrayRecord, dtypes: dict[str, np.dtype[Any]]) -> ArrayRecord:
    """Give aggregated arrays back the dtypes of the model's (FedAvg makes integers float)."""
    cast = {}
    for key, array in arrays.items():
        values = array.numpy()
        dtype = dtypes.get(key, values.dtype)
        if values.dtype != dtype:
            values = np.rint(values) if np.issubdtype(dtype, np.integer) else values
            values = values.astype(dtype)
        cast[key] = Array(np.asarray(values, order="C"))  # keeps 0-d arrays 0-d
    return ArrayRecord(cast)


def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())
