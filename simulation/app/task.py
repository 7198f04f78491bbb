"""The app's task, from its run config: the data, the model, where it is cut, the batches.

The data come from :mod:`simulation.app.datasets` (scikit-learn's bundled digits and breast-cancer
sets offline, a flwr-datasets hub dataset by name, or local parquet, csv and image-folder files,
all through one path), the models from :mod:`simulation.app.models`. The server builds the whole
model; a client builds it on the meta device and holds only its own parts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from splitfed import BatchSpec, SplitModel, Variant, split_model
from splitfed.privacy import ClientSecret

from .datasets import DataConfig, FederatedData, load_federated, loader
from .models import AUX_HEADS, DEFAULT_CUTS, build_model, digits_cnn

if TYPE_CHECKING:
    from .config import AppConfig

__all__ = [
    "batch_spec",
    "data_config",
    "digits_cnn",
    "evaluate_model",
    "federated_data",
    "model_split",
    "round_shuffle_seed",
    "test_loader",
    "train_loader",
    "whole_model",
]


def data_config(config: AppConfig) -> DataConfig:
    """The data part of the run config."""
    return DataConfig(
        dataset=config.dataset,
        data_files=config.data_files,
        data_dir=config.data_dir,
        data_subset=config.data_subset,
        input_key=config.input_key,
        label_key=config.label_key,
        partitioner=config.partitioner,
        dirichlet_alpha=config.dirichlet_alpha,
        classes_per_partition=config.classes_per_partition,
        shards_per_partition=config.shards_per_partition,
        test_fraction=config.test_fraction,
        seed=config.seed,
        image_size=config.image_size,
        standardize=config.standardize,
        cache_dir=config.cache_dir,
    )


def federated_data(config: AppConfig, *, num_partitions: int = 1) -> FederatedData:
    """The run's data, split among ``num_partitions`` clients (cached in the process)."""
    return load_federated(data_config(config), num_partitions=num_partitions)


def model_split(config: AppConfig, data: FederatedData, *, client_side: bool) -> SplitModel:
    """The run's model, cut where the run config says (or at the model's default cuts), with
    the auxiliary head ``aux-head`` names for ``variant = "local-loss"``.

    The server builds the whole model (seeded by the caller); with ``client_side`` the model is
    built on the meta device and only the client's parts get memory: their weights come from the
    server's message.
    """

    cut, server_cut = DEFAULT_CUTS.get(config.model, ("", ""))
    sample = data.sample_input()
    with torch.device("meta") if client_side else contextlib.nullcontext():
        model = whole_model(config, data)
    split = split_model(
        model,
        cut=config.cut or cut,
        server_cut=(config.server_cut or server_cut) if config.label_private else None,
        sample_input=sample,
    )
    if config.variant == Variant.LOCAL_LOSS:
        with torch.device("meta") if client_side else contextlib.nullcontext():
            split = split.with_aux_head(
                num_classes=data.num_classes, hidden_features=AUX_HEADS[config.aux_head]
            )
    return split.materialize_client() if client_side else split


def whole_model(config: AppConfig, data: FederatedData) -> nn.Module:
    """The run's model, uncut (on the current default device)."""
    extra = {"batch_norm": config.batch_norm} if config.model == "cnn" else {}
    return build_model(
        config.model, num_classes=data.num_classes, sample_input=data.sample_input(), **extra
    )


def batch_spec(data: FederatedData) -> BatchSpec:
    """Where a batch of ``data`` holds the inputs and the labels."""
    return BatchSpec(inputs=data.input_key, labels=data.label_key)


def train_loader(
    config: AppConfig,
    data: FederatedData,
    *,
    partition_id: int,
    server_round: int,
    secret: ClientSecret | None = None,
) -> DataLoader:
    """A client's training batches of a round, in an order of its own for each round.

    With ``secret`` (the ClientApp's) the order is drawn from the client's secret, which the
    server cannot derive. Without it the order comes from :func:`round_shuffle_seed`, which the
    server can derive from the run config: that links every release of an example, so it serves
    baselines, references in tests and ``client-randomness = "from-seed"`` only.
    """
    seed = (
        secret.seed("shuffle", server_round)
        if secret is not None
        else round_shuffle_seed(config.seed, server_round, partition_id)
    )
    return loader(
        data.train_partition(partition_id), batch_size=config.batch_size, shuffle_seed=seed
    )


def test_loader(config: AppConfig, data: FederatedData, *, partition_id: int) -> DataLoader:
    """A client's share of the held-out data, for federated evaluation."""
    return loader(data.test_partition(partition_id), batch_size=config.batch_size)


def round_shuffle_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's batch order in a round: new each round, the same in every run.

    Anyone who knows the run config can compute it, the server included; the ClientApp draws
    its order from the client's secret instead (:func:`train_loader`'s ``secret``), unless
    ``client-randomness = "from-seed"``.
    """
    return seed * 1_000_003 + server_round * 1_009 + partition_id


@torch.no_grad()
def evaluate_model(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on a labelled set."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        outputs = model(x)
        loss_sum += float(nn.functional.cross_entropy(outputs, y, reduction="sum"))
        correct += int((outputs.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / len(labels), correct / len(labels)
