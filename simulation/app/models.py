"""The app's models: the digits CNN (an ``nn.Sequential``), and what a user would bring: a small
residual CNN for images and an MLP for table rows.

The last two are not ``nn.Sequential``: each has a ``forward()`` with functional calls (``F.relu``,
``torch.flatten``) and is cut by the names of its submodules. :data:`DEFAULT_CUTS` names a (cut,
server-cut) pair for each: the client keeps the modules up to ``cut``; in the label-private split
the server stops at ``server-cut`` and the client runs the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AUX_HEADS",
    "DEFAULT_CUTS",
    "MODELS",
    "BasicBlock",
    "ModelFactory",
    "ResidualCNN",
    "TabularMLP",
    "build_model",
    "digits_cnn",
    "register_model",
    "residual_cnn",
    "tabular_mlp",
]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip connection (ResNet's basic block).

    A 1x1 convolution with BatchNorm (``downsample``) matches the skip's shape where the
    block changes the stride or the width.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResidualCNN(nn.Module):
    """A small ResNet: stem, ``layer1``-``layer3`` (widths w, 2w, 4w; strides 1, 2, 2),
    global average pooling and a linear ``fc`` head."""

    def __init__(
        self, *, num_classes: int, width: int, in_channels: int, blocks_per_stage: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, stride=1, blocks=blocks_per_stage)
        self.layer2 = self._stage(width, 2 * width, stride=2, blocks=blocks_per_stage)
        self.layer3 = self._stage(2 * width, 4 * width, stride=2, blocks=blocks_per_stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, *, stride: int, blocks: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride=stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def residual_cnn(
    *, num_classes: int = 10, width: int = 16, in_channels: int = 3, blocks_per_stage: int = 1
) -> ResidualCNN:
    """A small ResNet-style CNN for 3x32x32 images (any size of at least 4x4 works).

    Cut at ``layer1``, the client half (stem and ``layer1``) holds about 7 % of the
    parameters; with ``server_cut="layer3"`` the client also runs ``avgpool`` and ``fc``.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc``. (default: 10)
    width : int
        Channels of ``layer1``; ``layer2`` and ``layer3`` have twice and four times as many.
        (default: 16)
    in_channels : int
        Channels of the input images. (default: 3)
    blocks_per_stage : int
        Basic blocks in each of ``layer1``-``layer3``. (default: 1)

    Returns
    -------
    ResidualCNN
        A freshly initialised model.
    """
    problems = [
        f"{name}={value} must be at least 1"
        for name, value in (
            ("num_classes", num_classes),
            ("width", width),
            ("in_channels", in_channels),
            ("blocks_per_stage", blocks_per_stage),
        )
        if value < 1
    ]
    if problems:
        raise ValueError("residual_cnn: " + "; ".join(problems))
    return ResidualCNN(
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        blocks_per_stage=blocks_per_stage,
    )


class TabularMLP(nn.Module):
    """Three linear layers ``fc1``-``fc3`` with ReLUs between them; inputs are flattened."""

    def __init__(self, *, num_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def tabular_mlp(*, num_features: int, num_classes: int, hidden: int = 64) -> TabularMLP:
    """An MLP for feature vectors (e.g. the 30 breast-cancer features).

    Parameters
    ----------
    num_features : int
        Length of an input vector (inputs of any shape are flattened first).
    num_classes : int
        Outputs of ``fc3``.
    hidden : int
        Width of ``fc1`` and ``fc2``. (default: 64)

    Returns
    -------
    TabularMLP
        A freshly initialised model.
    """
    if min(num_features, num_classes, hidden) < 1:
        raise ValueError(
            f"tabular_mlp: num_features={num_features}, num_classes={num_classes} and "
            f"hidden={hidden} must all be at least 1"
        )
    return TabularMLP(num_features=num_features, num_classes=num_classes, hidden=hidden)


def digits_cnn(
    *,
    batch_norm: bool = False,
    in_channels: int = 1,
    image_size: tuple[int, int] = (8, 8),
    num_classes: int = 10,
) -> nn.Sequential:
    """A small CNN, by default for 8x8 digits. Its convolutional block ends at the child
    ``pool``, its head is ``fc1``, ``relu3``, ``fc2``.

    With ``batch_norm`` each convolution is followed by BatchNorm (``norm1``, ``norm2``), whose
    running statistics travel and are averaged with the client half.
    """

    def norm(name: str, channels: int) -> list[tuple[str, nn.Module]]:
        return [(name, nn.BatchNorm2d(channels))] if batch_norm else []

    height, width = image_size
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)),
                *norm("norm1", 16),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
                *norm("norm2", 32),
                ("relu2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(32 * (height // 2) * (width // 2), 64)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(64, num_classes)),
            ]
        )
    )


def _cnn(
    *, num_classes: int, sample_input: torch.Tensor, batch_norm: bool = False, **options: Any
) -> nn.Module:
    if sample_input.dim() != 4:
        raise ValueError(
            f"model='cnn' takes image batches (N, C, H, W); the data's inputs have shape "
            f"{tuple(sample_input.shape)}. Use model='mlp' for feature vectors"
        )
    _, channels, height, width = sample_input.shape
    return digits_cnn(
        batch_norm=batch_norm,
        in_channels=channels,
        image_size=(height, width),
        num_classes=num_classes,
    )


class ModelFactory(Protocol):
    """Builds a model for ``num_classes`` classes whose input batches look like
    ``sample_input``."""

    def __call__(
        self, *, num_classes: int, sample_input: torch.Tensor, **options: Any
    ) -> nn.Module: ...


def _resnet(*, num_classes: int, sample_input: torch.Tensor, **options: Any) -> nn.Module:
    if sample_input.dim() != 4:
        raise ValueError(
            f"model='resnet' takes image batches (N, C, H, W); the data's inputs have shape "
            f"{tuple(sample_input.shape)}. Use model='mlp' for feature vectors"
        )
    return residual_cnn(num_classes=num_classes, in_channels=sample_input.shape[1])


def _mlp(*, num_classes: int, sample_input: torch.Tensor, **options: Any) -> nn.Module:
    return tabular_mlp(num_features=sample_input[0].numel(), num_classes=num_classes)


MODELS: dict[str, ModelFactory] = {"cnn": _cnn, "resnet": _resnet, "mlp": _mlp}
"""Models by run-config name; :func:`register_model` adds more."""

DEFAULT_CUTS: dict[str, tuple[str, str]] = {
    "cnn": ("pool", "relu3"),
    "resnet": ("layer1", "layer3"),
    "mlp": ("fc1", "fc2"),
}
"""(cut, server-cut) of each model: the client keeps the modules up to ``cut``; in the
label-private split the server stops at ``server-cut``."""

AUX_HEADS: dict[str, int] = {"linear": 0, "mlp": 128}
"""The local-loss auxiliary heads by run-config name (``aux-head``): the hidden width of
:func:`splitfed.default_aux_head` (0: one linear layer)."""


def register_model(
    name: str, factory: ModelFactory | Callable[..., nn.Module], *, cuts: tuple[str, str]
) -> None:
    """Make ``build_model(name, ...)`` build a model with ``factory``.

    Parameters
    ----------
    name : str
        The run-config name of the model.
    factory : callable
        ``factory(*, num_classes, sample_input) -> nn.Module``.
    cuts : tuple of str
        The model's default (cut, server-cut): names of its submodules.
    """
    MODELS[name] = factory
    DEFAULT_CUTS[name] = cuts


def build_model(
    name: str, *, num_classes: int, sample_input: torch.Tensor, **options: Any
) -> nn.Module:
    """A new model by run-config name, sized for the data.

    Parameters
    ----------
    name : str
        ``"resnet"``, ``"mlp"`` or a name given to :func:`register_model`.
    num_classes : int
        The number of classes (outputs).
    sample_input : torch.Tensor
        A batch shaped like the model's input (``FederatedData.sample_input()``): the input
        channels and feature count are read from it.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model; :data:`DEFAULT_CUTS` ``[name]`` names where to cut it.
    """
    if name not in MODELS:
        raise ValueError(
            f"model={name!r} is not known; use one of {', '.join(MODELS)} or add it with "
            "register_model"
        )
    return MODELS[name](num_classes=num_classes, sample_input=sample_input, **options)
