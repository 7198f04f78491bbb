"""The benchmark's workloads: the models, where they are cut, and the shape of their data.

Speed does not depend on pixel values, so the benchmark trains on synthetic tensors of a real
dataset's shape (MNIST: 1x28x28, CIFAR-10: 3x32x32, 10 classes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from splitfed import SplitModel, split_model

__all__ = [
    "WORKLOADS",
    "Workload",
    "lenet5",
    "resnet18_style",
    "synthetic_partition",
    "weighted_average",
]


def lenet5() -> nn.Sequential:
    """LeNet-5 for 1x28x28 inputs; its first conv block ends at the child ``pool1``."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, kernel_size=5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, kernel_size=5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * 5 * 5, 120),
            relu3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu4=nn.ReLU(),
            fc3=nn.Linear(84, 10),
        )
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18_style(*, width: int = 16) -> nn.Sequential:
    """ResNet-18 for 3x32x32 inputs (CIFAR stem, stages of 2 basic blocks), ``width`` channels in
    the first stage (ResNet-18 has 64; 16 keeps a CPU benchmark short). Its first residual stage
    is the child ``stage1``."""

    def stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)
        )

    w = width
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(
                nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
            ),
            stage1=stage(w, w, 1),
            stage2=stage(w, 2 * w, 2),
            stage3=stage(2 * w, 4 * w, 2),
            stage4=stage(4 * w, 8 * w, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8 * w, 10),
        )
    )


@dataclass(frozen=True)
class Workload:
    """A model, its cut, and the data of one benchmark run."""

    name: str
    description: str
    model: str
    cut: str
    input_shape: tuple[int, ...]
    num_clients: int
    samples_per_client: int
    batch_size: int
    quick_samples_per_client: int

    def build(self, seed: int = 0) -> nn.Sequential:
        torch.manual_seed(seed)
        return lenet5() if self.model == "lenet5" else resnet18_style()

    def split(self, seed: int = 0) -> SplitModel:
        return split_model(
            self.build(seed), cut=self.cut, sample_input=torch.zeros(2, *self.input_shape)
        )


WORKLOADS = {
    "W1": Workload(
        name="W1",
        description="LeNet-5, cut after conv block 1, 1x28x28",
        model="lenet5",
        cut="pool1",
        input_shape=(1, 28, 28),
        num_clients=10,
        samples_per_client=5000,
        batch_size=32,
        quick_samples_per_client=320,
    ),
    "W2": Workload(
        name="W2",
        description="ResNet-18-style (width 16), cut after stage 1, 3x32x32",
        model="resnet18",
        cut="stage1",
        input_shape=(3, 32, 32),
        num_clients=4,
        samples_per_client=2000,
        batch_size=64,
        quick_samples_per_client=128,
    ),
}


def synthetic_partition(
    workload: Workload, *, client: int, samples: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels of the workload's shape for one client, the same every time."""
    generator = torch.Generator().manual_seed(seed * 1_000 + client)
    inputs = torch.randn(samples, *workload.input_shape, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    return inputs, labels


def batches(
    inputs: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The data in order, as a list of batches (the last one may be smaller)."""
    return [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def weighted_average(
    states: list[dict[str, torch.Tensor]], weights: list[int]
) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts: the mean weighted by ``weights`` (examples), summed in float64 and
    returned in each entry's own dtype."""
    total = sum(weights)
    return {
        key: sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
            reference.dtype
        )
        for key, reference in states[0].items()
    }
