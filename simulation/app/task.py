"""The digits task: scikit-learn's bundled handwritten digits, a small CNN, Flower partitioners.

``load_digits`` ships inside scikit-learn (1,797 real 8x8 images), so the task runs offline.
Training data is partitioned among clients with ``flwr-datasets`` partitioners; a stratified
held-out test set stays on the server for central evaluation.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splitfed import SplitModel, split_model

__all__ = [
    "DigitsData",
    "round_shuffle_seed",
    "digits_cnn",
    "digits_split",
    "evaluate_model",
    "load_digits_split",
    "partition_loader",
    "partition_indices",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def digits_cnn(*, batch_norm: bool = False) -> nn.Sequential:
    """A small CNN for 8x8 digits. Its convolutional block ends at the child ``pool``.

    With ``batch_norm`` each convolution is followed by BatchNorm (``norm1``, ``norm2``), whose
    running statistics travel and are averaged with the client half.
    """

    def norm(name: str, channels: int) -> list[tuple[str, nn.Module]]:
        return [(name, nn.BatchNorm2d(channels))] if batch_norm else []

    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 16, kernel_size=3, padding=1)),
                *norm("norm1", 16),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
                *norm("norm2", 32),
                ("relu2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(32 * 4 * 4, 64)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(64, NUM_CLASSES)),
            ]
        )
    )


def digits_split(
    *,
    cut: int | str = "pool",
    server_cut: int | str | None = None,
    batch_norm: bool = False,
    client_side: bool = False,
) -> SplitModel:
    """The digits CNN cut at ``cut`` (by default right after its convolutional block). With a
    ``server_cut`` (e.g. ``"relu3"``), the label-private split: the client keeps the layers
    after it (``fc2``) and the loss. With ``client_side``, the model is built on the meta
    device and only the client's parts get memory (their weights come from the server)."""
    with torch.device("meta") if client_side else contextlib.nullcontext():
        model = digits_cnn(batch_norm=batch_norm)
    split = split_model(
        model, cut=cut, server_cut=server_cut, sample_input=torch.zeros(2, *IMAGE_SHAPE)
    )
    return split.materialize_client() if client_side else split


@dataclass(frozen=True)
class DigitsData:
    """Digits as tensors: images scaled to [0, 1], shape (N, 1, 8, 8); labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@lru_cache(maxsize=4)
def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """Load scikit-learn's digits and hold out a stratified test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test-fraction must be between 0 and 1; got {test_fraction}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return DigitsData(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
    )


@lru_cache(maxsize=64)
def partition_indices(
    *,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    subset: str = "train",
) -> tuple[tuple[int, ...], ...]:
    """Split the ``subset`` ("train" or "test") indices among ``num_partitions`` clients with
    flwr-datasets.

    ``partitioner`` is ``"iid"`` (IidPartitioner) or ``"dirichlet"`` (DirichletPartitioner over
    the labels with concentration ``alpha``; smaller is more skewed).
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    data = load_digits_split(test_fraction=test_fraction, seed=seed)
    labels = data.train_labels if subset == "train" else data.test_labels
    n = len(labels)
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num-partitions must be between 1 and {n}; got {num_partitions}")
    table = Dataset.from_dict({"index": list(range(n)), "label": labels.tolist()})
    if partitioner == "iid":
        part: Any = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            seed=seed,
        )
    else:
        raise ValueError(f"partitioner must be 'iid' or 'dirichlet'; got {partitioner!r}")
    part.dataset = table
    return tuple(tuple(part.load_partition(i)["index"]) for i in range(num_partitions))


def partition_loader(
    *,
    partition_id: int,
    num_partitions: int,
    batch_size: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    shuffle_seed: int | None = None,
    test_fraction: float = 0.2,
    subset: str = "train",
) -> DataLoader:
    """The batches of one client's share of ``subset`` ("train", or "test" for federated
    evaluation). ``shuffle_seed=None`` keeps the partition's order."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check the node's "
            "--node-config 'partition-id=... num-partitions=...'"
        )
    data = load_digits_split(test_fraction=test_fraction, seed=seed)
    indices = torch.tensor(
        partition_indices(
            num_partitions=num_partitions,
            partitioner=partitioner,
            alpha=alpha,
            seed=seed,
            test_fraction=test_fraction,
            subset=subset,
        )[partition_id],
        dtype=torch.long,
    )
    images, labels = (
        (data.train_images, data.train_labels)
        if subset == "train"
        else (data.test_images, data.test_labels)
    )
    dataset = TensorDataset(images[indices], labels[indices])
    generator = None
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator
    )


def round_shuffle_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's batch order in a round: new each round, the same in every run."""
    return seed * 1_000_003 + server_round * 1_009 + partition_id


@torch.no_grad()
def evaluate_model(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on a labelled set."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        outputs = model(x)
        loss_sum += float(nn.functional.cross_entropy(outputs, y, reduction="sum"))
        correct += int((outputs.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / len(labels), correct / len(labels)
