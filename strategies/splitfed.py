"""SplitFed as a Flower strategy."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore import log

from splitfed.client import TICKET_KEY, DataPlaneTicket
from splitfed.config import OptimizerConfig, Variant
from splitfed.cut import SplitModel
from splitfed.server import RoundStats, SplitServer
from splitfed.server_half import LossFn, make_trainer
from splitfed.tls import TLSCredentials

__all__ = ["SplitFed", "SplitFedEvaluateFn", "SplitFedResult"]

SplitFedEvaluateFn = Callable[[int, ArrayRecord, ArrayRecord], MetricRecord | None]
"""``evaluate_fn(server_round, client_half_arrays, server_half_arrays)``."""


@dataclass
class SplitFedResult(Result):
    """Flower's :class:`Result` (``arrays`` is the global client half), plus the server half and
    what crossed the data plane in each round."""

    server_half_arrays: ArrayRecord = field(default_factory=ArrayRecord)
    round_metrics: dict[int, MetricRecord] = field(default_factory=dict)


class SplitFed(Strategy):
    """SplitFed: split learning with federated averaging of the client halves.

    Flower carries one ``train`` message per selected client per round; the split server, which
    this strategy starts for the length of :meth:`start`, carries every batch. Node selection
    and the aggregation of client halves are delegated to ``aggregator``, an ordinary Flower
    strategy, so FedAvg, FedProx, FedAdam, Krum, ... work unchanged on the client halves.

    Parameters
    ----------
    split : SplitModel
        The cut model, from :func:`splitfed.split_model` or :func:`splitfed.join_halves`. Its
        server half is copied: the strategy trains the copy.
    variant : str (default: "v1")
        ``"v1"`` (SFLV1: one server-half copy per client, averaged with the client halves) or
        ``"v2"`` (SFLV2: one server half, updated by each client's batches in arrival order).
    server_optimizer : OptimizerConfig | None (default: None)
        The server-half optimizer; ``None`` means ``OptimizerConfig()`` (SGD, lr 0.05). It keeps
        its state across batches and rounds.
    loss_fn : Callable[[Tensor, Tensor], Tensor] | None (default: None)
        The training loss on the server half's output; ``None`` means cross-entropy.
    aggregator : Strategy | None (default: None)
        Selects clients and merges client halves. ``None`` means
        ``FedAvg(fraction_evaluate=0.0)``. The SFLV1 server-half copies are always merged with
        FedAvg weighted by examples, whatever ``aggregator`` does with the client halves.
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
        Most clients streaming at once.
    tls : TLSCredentials | None (default: None)
        The split server's TLS certificate and CA. Clients receive the CA inside their
        ``train`` message and verify the split server with it. Required unless
        ``insecure=True``.
    insecure : bool (default: False)
        Serve the data plane in plaintext, for a single machine or a private network only;
        logs a warning.
    """

    def __init__(
        self,
        *,
        split: SplitModel,
        variant: str = Variant.V1,
        server_optimizer: OptimizerConfig | None = None,
        loss_fn: LossFn | None = None,
        aggregator: Strategy | None = None,
        merge_every: int = 1,
        split_server_address: str = "127.0.0.1:0",
        advertised_address: str | None = None,
        device: str = "cpu",
        max_streams: int = 64,
        tls: TLSCredentials | None = None,
        insecure: bool = False,
    ) -> None:
        if merge_every < 1:
            raise ValueError(f"merge_every must be at least 1; got {merge_every}")
        self.variant = Variant.validate(variant)
        self.merge_every = merge_every
        self.aggregator = aggregator if aggregator is not None else FedAvg(fraction_evaluate=0.0)
        self.trainer = make_trainer(
            self.variant,
            server_half=copy.deepcopy(split.server_half),
            optimizer=server_optimizer or OptimizerConfig(),
            loss_fn=loss_fn,
            device=device,
        )
        self.client_half_keys = tuple(split.client_half.state_dict())
        self.split_server = SplitServer(
            trainer=self.trainer,
            activation_shape=split.activation_shape,
            activation_dtype=split.activation_dtype,
            address=split_server_address,
            advertised_address=advertised_address,
            max_streams=max_streams,
            tls=tls,
            insecure=insecure,
        )
        self._root_certificates = tls.root_certificates.decode() if tls else ""
        self._num_rounds = 0
        self._round_started = 0.0
        self._round_metrics: dict[int, MetricRecord] = {}
        self._sync_bytes = 0
        self._global_dtypes: dict[str, np.dtype] = {}

    # -- Strategy API ---------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the SplitFed settings, then the aggregator's."""
        log(INFO, "\t├──> SplitFed settings:")
        log(INFO, "\t│\t├── Variant: SFL%s", self.variant.upper())
        log(INFO, "\t│\t├── Split server: %s", self.split_server.address or "(not started)")
        log(
            INFO, "\t│\t├── Data-plane TLS: %s", "on" if self.split_server.tls else "OFF (insecure)"
        )
        log(INFO, "\t│\t├── Server optimizer: %s", self.trainer.optimizer_config)
        log(INFO, "\t│\t├── Merge every: %d round(s)", self.merge_every)
        log(INFO, "\t│\t└── Client-half aggregator: %s", type(self.aggregator).__name__)
        self.aggregator.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select clients through the aggregator and hand each its data-plane ticket."""
        self._round_started = time.perf_counter()
        messages = list(self.aggregator.configure_train(server_round, arrays, config, grid))
        tokens = self.split_server.open_round(
            server_round, [msg.metadata.dst_node_id for msg in messages]
        )
        resume_local = (server_round - 1) % self.merge_every != 0
        self._sync_bytes = _array_bytes(arrays) * len(messages)
        tickets = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            ticket = DataPlaneTicket(
                address=str(self.split_server.address),
                token=tokens[node_id],
                server_round=server_round,
                resume_local=resume_local,
                send_client_half=self._merges_after(server_round),
                root_certificates=self._root_certificates,
            )
            # The aggregator may share one RecordDict among its messages: give each its own.
            content = RecordDict({**msg.content, TICKET_KEY: ticket.to_record()})
            tickets.append(
                Message(content, dst_node_id=node_id, message_type=msg.metadata.message_type)
            )
        return tickets

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge client halves through the aggregator, and SFLV1 server halves with FedAvg."""
        replies = list(replies)
        stats = self.split_server.close_round()
        completed = [msg for msg in replies if not msg.has_error()]
        merge = self._merges_after(server_round)
        if merge:
            arrays, metrics = self.aggregator.aggregate_train(server_round, replies)
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
            for msg in replies:
                if msg.has_error():
                    log(WARNING, "Node %d failed: %s", msg.metadata.src_node_id, msg.error.reason)
            contents = [msg.content for msg in completed]
            arrays, metrics = (
                None,
                aggregate_metricrecords(contents, "num-examples") if contents else None,
            )
        self._sync_bytes += sum(
            _array_bytes(record)
            for msg in completed
            for record in msg.content.array_records.values()
        )
        self._record_round(
            server_round,
            stats,
            clients=len(replies),
            failed=len(replies) - len(completed),
            merged=merge,
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the merged model is evaluated centrally (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    # pylint: disable=too-many-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: SplitFedEvaluateFn | None = None,
    ) -> SplitFedResult:
        """Run SplitFed for ``num_rounds`` rounds; see Flower's ``Strategy.start``.

        The split server runs for the length of this call. ``initial_arrays`` is the initial
        client half. ``evaluate_fn(server_round, client_half_arrays, server_half_arrays)``, if
        given, evaluates the merged full model centrally before the first round and after each.
        """
        self._check_client_half(initial_arrays)
        self._num_rounds = num_rounds
        self._round_metrics = {}
        self._global_dtypes = {key: array.numpy().dtype for key, array in initial_arrays.items()}

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = (
                evaluate_fn(server_round, arrays, self.server_half_arrays())
                if evaluate_fn
                else None
            )
            self._log_round(server_round, metrics)
            return metrics

        with self.split_server:
            result = super().start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=evaluate,
            )
        return SplitFedResult(
            arrays=result.arrays,
            train_metrics_clientapp=result.train_metrics_clientapp,
            evaluate_metrics_clientapp=result.evaluate_metrics_clientapp,
            evaluate_metrics_serverapp=result.evaluate_metrics_serverapp,
            server_half_arrays=self.server_half_arrays(),
            round_metrics=dict(self._round_metrics),
        )

    # -- helpers --------------------------------------------------------------------------------

    def server_half_arrays(self) -> ArrayRecord:
        """The global server half, as an ``ArrayRecord``."""
        return ArrayRecord(self.trainer.server_half.state_dict())

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
                "initial_arrays do not match the client half of the SplitModel: expected keys "
                f"{list(self.client_half_keys)}, got {list(arrays)}. Pass "
                "ArrayRecord(split.client_half.state_dict())"
            )

    def _record_round(
        self, server_round: int, stats: RoundStats, *, clients: int, failed: int, merged: bool
    ) -> None:
        self._round_metrics[server_round] = MetricRecord(
            {
                "data-plane-bytes": stats.data_plane_bytes,
                "data-plane-batches": stats.batches,
                "refused-batches": stats.refused_batches,
                "refused-streams": stats.refused_streams,
                "model-sync-bytes": self._sync_bytes,
                "clients": clients,
                "failed-clients": failed,
                "merged": int(merged),
                "round-seconds": time.perf_counter() - self._round_started,
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
            round_metrics["data-plane-bytes"] / 1e6,
            round_metrics["data-plane-batches"],
            round_metrics["model-sync-bytes"] / 1e6,
            round_metrics["round-seconds"],
        )


def _cast_like(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """Give aggregated arrays back the dtypes of the model's (FedAvg makes integers float)."""
    cast = {}
    for key, array in arrays.items():
        values = array.numpy()
        dtype = dtypes.get(key, values.dtype)
        if values.dtype != dtype:
            values = np.rint(values) if np.issubdtype(dtype, np.integer) else values
            values = values.astype(dtype)
        cast[key] = Array(np.ascontiguousarray(values))
    return ArrayRecord(cast)


def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())
