"""The ServerApp: SplitFed on the run config's task, evaluated centrally and on the clients."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, Result, Strategy
from flwr.supercore import log

from splitfed import (
    CheckpointConfig,
    LeakageMonitor,
    ServerCopies,
    SplitFed,
    SplitFedResult,
    TLSCredentials,
    Variant,
)

from . import fedavg
from .config import AppConfig
from .plots import plot_run
from .task import evaluate_model, federated_data, model_split, whole_model

app = ServerApp()

CHECKPOINT_NAME = "checkpoint.pt"
"""Written to ``output-dir`` after every merged round; a run with the same output folder and
run config resumes from it."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run SplitFed for ``num-server-rounds`` rounds and report the merged model's accuracy."""
    config = AppConfig.from_run_config(context.run_config)
    # The app seeds the process: its model's initial weights and Flower's client sampling
    # (Python's `random`) follow the run config's seed.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    data = federated_data(config)
    test_inputs, test_labels = data.central_test()
    output_dir = Path(config.output_dir) if config.output_dir else None
    if config.variant == fedavg.FEDAVG:
        run_fedavg(grid, config, whole_model(config, data), test_inputs, test_labels, output_dir)
        return
    split = model_split(config, data, client_side=False)
    device = config.resolved_server_device()
    local_loss = config.variant == Variant.LOCAL_LOSS
    server_copies = config.server_copies if local_loss else None
    per_client = config.variant == Variant.V1 or server_copies == ServerCopies.PER_CLIENT
    strategy = SplitFed(
        split=split,
        variant=config.variant,
        server_copies=server_copies,
        send_every=config.send_every,
        server_optimizer=config.server_optimizer,
        aggregator=make_aggregator(config),
        merge_every=config.merge_every,
        split_server_address=config.split_server_address,
        advertised_address=config.split_server_advertised_address or None,
        tls=None
        if config.split_server_insecure
        else TLSCredentials.from_files(
            certfile=config.split_server_certfile,
            keyfile=config.split_server_keyfile,
            ca_certfile=config.split_server_ca_certfile,
        ),
        insecure=config.split_server_insecure,
        device=device,
        data_plane_compression=config.data_plane_compression,
        max_failed_rounds=config.max_failed_rounds,
        # Copies per client serve concurrent clients in parallel: one core each beats all
        # fighting over all.
        server_threads=1 if per_client and device == "cpu" else None,
        checkpoint=CheckpointConfig(
            path=output_dir / CHECKPOINT_NAME,
            fingerprint=config.fingerprint(),
            global_rng=True,  # a resumed run samples the clients an uninterrupted one would
        )
        if output_dir
        else None,
        leakage_monitor=leakage_monitor(config, test_inputs, test_labels),
        client_heads=config.client_heads,
    )
    # With the heads kept on the clients this process holds no whole model: accuracy comes
    # from federated evaluation alone.
    heads_local = config.client_heads == "local"

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(
            split.client_half.state_dict() if heads_local else split.client_state_dict()
        ),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        evaluate_fn=None
        if heads_local
        else timed_evaluation(
            lambda arrays: evaluate_model(strategy.global_model(arrays), test_inputs, test_labels)
        ),
    )
    report(
        config,
        result,
        # Without heads: what this process holds, under the model's own keys.
        {
            **result.arrays.to_torch_state_dict(),
            **strategy.server_half_arrays().to_torch_state_dict(),
        }
        if heads_local
        else strategy.global_model(result.arrays),
        output_dir,
        Variant.describe(config.variant, server_copies)
        + (", client heads kept on the clients" if heads_local else ""),
    )


def leakage_monitor(
    config: AppConfig, test_inputs: torch.Tensor, test_labels: torch.Tensor
) -> LeakageMonitor | None:
    """The leakage monitor the run config asks for, attacking with the ServerApp's own test
    examples (data the clients never train on). The plain split sends labels, so its attacker
    re-identifies among examples of the same class; in the label-private split the labels are
    what it attacks."""
    if not config.leakage_monitor:
        return None
    return LeakageMonitor(
        auxiliary_inputs=test_inputs,
        auxiliary_labels=test_labels,
        privacy=config.privacy(),
        threshold=config.leakage_threshold if config.leakage_threshold < 1.0 else None,
        label_threshold=(
            config.leakage_label_threshold if config.leakage_label_threshold < 1.0 else None
        ),
        action=config.leakage_action,
        every=config.leakage_every,
        steps_per_round=config.leakage_steps,
        client_batch_size=config.batch_size,
        seed=config.seed,
    )


def run_fedavg(
    grid: Grid,
    config: AppConfig,
    model: torch.nn.Module,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    output_dir: Path | None,
) -> None:
    """The baseline: the whole model trained on the clients, merged by the aggregator."""

    def evaluate(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate_model(model, test_inputs, test_labels)

    result = make_aggregator(config).start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        evaluate_fn=timed_evaluation(evaluate),
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    report(config, result, model, output_dir, f"{config.aggregator} of the whole model (no split)")


def timed_evaluation(
    evaluate: Callable[[ArrayRecord], tuple[float, float]],
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Central evaluation for Flower's ``evaluate_fn``, adding ``round-wall-seconds``: the time
    from the end of the previous round's evaluation to the start of this one, which is the
    round itself (training, merging, federated evaluation), measured alike for every variant."""
    previous_end: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        loss, accuracy = evaluate(arrays)
        metrics = {"test-accuracy": accuracy, "test-loss": loss}
        if previous_end:
            metrics["round-wall-seconds"] = start - previous_end[0]
        previous_end[:] = [time.perf_counter()]
        return MetricRecord(metrics)

    return evaluate_fn


def report(
    config: AppConfig,
    result: Result,
    model: torch.nn.Module | dict[str, torch.Tensor],
    output_dir: Path | None,
    description: str,
) -> None:
    """Log the final accuracy; write the model (or the state this process holds), metrics and
    their picture to ``output_dir``."""
    evaluations = (
        ("test", "", result.evaluate_metrics_serverapp, "test-"),
        (
            "federated",
            ", on the clients' own test data",
            result.evaluate_metrics_clientapp,
            "eval-",
        ),
    )
    for what, where, history, prefix in evaluations:
        if history:
            # The last round evaluated: a run the leakage monitor stopped ends early.
            last_round = max(history)
            final = history[last_round]
            log(
                INFO,
                "[SplitFed] final %s accuracy %.4f (loss %.4f%s) after %d rounds of %s",
                what,
                final[f"{prefix}accuracy"],
                final[f"{prefix}loss"],
                where,
                last_round,
                description,
            )
            break
    else:
        log(WARNING, "[SplitFed] no round was evaluated: no accuracy to report (%s)", description)
    if output_dir is not None:
        save_result(
            output_dir, result, model, title=f"{description}, {config.model} on {config.dataset}"
        )


def make_aggregator(config: AppConfig) -> Strategy:
    """The Flower strategy that selects clients, merges client halves and aggregates the
    clients' evaluation metrics."""
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": config.min_evaluate_nodes,
        "min_available_nodes": max(config.min_train_nodes, config.min_evaluate_nodes),
    }
    if config.aggregator == "fedprox":
        return FedProx(**sampling, proximal_mu=config.proximal_mu)
    if config.aggregator == "fedmedian":
        return FedMedian(**sampling)
    return FedAvg(**sampling)


def run_history(result: Result) -> dict[int, dict[str, float]]:
    """Per round: what crossed the data plane (SplitFed only), the central and federated
    evaluation, and the clients' training metrics (``train-`` keys)."""
    round_metrics = result.round_metrics if isinstance(result, SplitFedResult) else {}
    rounds = set(round_metrics) | set(result.train_metrics_clientapp)
    return {
        server_round: {
            **dict(round_metrics.get(server_round, {})),
            **dict(result.evaluate_metrics_serverapp.get(server_round, {})),
            **{
                f"federated-{key}": value
                for key, value in dict(
                    result.evaluate_metrics_clientapp.get(server_round, {})
                ).items()
            },
            **{
                key if key.startswith("train-") else f"train-{key}": value
                for key, value in dict(result.train_metrics_clientapp.get(server_round, {})).items()
            },
        }
        for server_round in sorted(rounds)
    }


def save_result(
    output_dir: Path,
    result: Result,
    model: torch.nn.Module | dict[str, torch.Tensor],
    *,
    title: str,
) -> None:
    """Write the final model (``model.pt``: its ``state_dict``, the original model's keys; with
    the client heads kept on the clients, the two halves' without the head's), the per-round
    metrics (``metrics.json``) and their picture (``metrics.png``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    torch.save(state, output_dir / "model.pt")
    history = run_history(result)
    (output_dir / "metrics.json").write_text(
        json.dumps({str(r): values for r, values in history.items()}, indent=2)
    )
    picture = plot_run(
        history,
        output_dir / "metrics.png",
        initial=result.evaluate_metrics_serverapp.get(0),
        title=title,
    )
    log(
        INFO,
        "[SplitFed] wrote %s, %s and %s",
        output_dir / "model.pt",
        output_dir / "metrics.json",
        picture,
    )
