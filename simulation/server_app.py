"""The ServerApp: SplitFed on the digits task, evaluated centrally on held-out digits."""

from __future__ import annotations

import json
import random
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, Strategy
from flwr.supercore import log

from splitfed import LabelPrivateSplit, SplitModel, TLSCredentials
from splitfed.cut import load_client_state_dict
from strategies import SplitFed, SplitFedResult

from .config import AppConfig
from .task import (
    digits_label_private_split,
    digits_split,
    evaluate_model,
    load_digits_split,
)

app = ServerApp()

CHECKPOINT_NAME = "checkpoint.pt"
"""Written to ``output-dir`` after every merged round; a run with the same output folder and
run config resumes from it."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run SplitFed for ``num-server-rounds`` rounds and report the merged model's accuracy."""
    config = AppConfig.from_run_config(context.run_config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)  # Flower samples nodes with `random`
    np.random.seed(config.seed)

    data = load_digits_split(test_fraction=config.test_fraction, seed=config.seed)
    if config.label_private:
        split = digits_label_private_split(
            cut=config.cut, server_cut=config.server_cut, batch_norm=config.batch_norm
        )
    else:
        split = digits_split(cut=config.cut, batch_norm=config.batch_norm)
    device = config.resolved_server_device()
    strategy = SplitFed(
        split=split,
        variant=config.variant,
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
        # SFLV1 serves concurrent clients in parallel: one core each beats all fighting over all.
        server_threads=1 if config.variant == "v1" and device == "cpu" else None,
    )
    full_model = split.full_model()

    def evaluate(
        server_round: int, client_half: ArrayRecord, server_half: ArrayRecord
    ) -> MetricRecord:
        load_client_arrays(split, client_half)
        split.server_half.load_state_dict(server_half.to_torch_state_dict())
        loss, accuracy = evaluate_model(full_model, data.test_images, data.test_labels)
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    output_dir = Path(config.output_dir) if config.output_dir else None
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(
            split.client_state_dict() if config.label_private else split.client_half.state_dict()
        ),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        evaluate_fn=evaluate,
        checkpoint_path=output_dir / CHECKPOINT_NAME if output_dir else None,
        run_fingerprint=config.fingerprint(),
    )
    final = result.evaluate_metrics_serverapp[config.num_server_rounds]
    log(
        INFO,
        "[SplitFed] final test accuracy %.4f (loss %.4f) after %d rounds of SFL%s",
        final["test-accuracy"],
        final["test-loss"],
        config.num_server_rounds,
        config.variant.upper(),
    )
    if output_dir is not None:
        save_result(output_dir, result, split)


def load_client_arrays(split: SplitModel | LabelPrivateSplit, arrays: ArrayRecord) -> None:
    """Load the clients' merged arrays: the client half, and the client head if there is one."""
    if isinstance(split, LabelPrivateSplit):
        load_client_state_dict(split.client_half, split.client_head, arrays.to_torch_state_dict())
    else:
        split.client_half.load_state_dict(arrays.to_torch_state_dict())


def make_aggregator(config: AppConfig) -> Strategy:
    """The Flower strategy that selects clients and merges their client halves."""
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": config.min_train_nodes,
        "min_available_nodes": config.min_train_nodes,
    }
    if config.aggregator == "fedprox":
        return FedProx(**sampling, proximal_mu=config.proximal_mu)
    if config.aggregator == "fedmedian":
        return FedMedian(**sampling)
    return FedAvg(**sampling)


def save_result(
    output_dir: Path,
    result: SplitFedResult,
    split: SplitModel | LabelPrivateSplit,
) -> None:
    """Write the final halves (``model.pt``) and per-round metrics (``metrics.json``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    load_client_arrays(split, result.arrays)
    split.server_half.load_state_dict(result.server_half_arrays.to_torch_state_dict())
    model = {"client_half": split.client_half.state_dict()}
    model["server_half"] = split.server_half.state_dict()
    if isinstance(split, LabelPrivateSplit):
        model["client_head"] = split.client_head.state_dict()
    torch.save(model, output_dir / "model.pt")
    rounds = sorted(result.round_metrics)
    history = {
        str(r): {
            **dict(result.round_metrics[r]),
            **dict(result.evaluate_metrics_serverapp.get(r, {})),
            **{
                f"train-{k}" if not k.startswith("train-") else k: v
                for k, v in dict(result.train_metrics_clientapp.get(r, {})).items()
            },
        }
        for r in rounds
    }
    (output_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    log(INFO, "[SplitFed] wrote %s and %s", output_dir / "model.pt", output_dir / "metrics.json")
