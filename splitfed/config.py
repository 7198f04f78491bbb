"""Small configs shared by the client and the server side."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

__all__ = ["OptimizerConfig", "Variant", "load_optimizer_state", "save_optimizer_state"]


class Variant:
    """The SplitFed variants, named as in Thapa et al. (arXiv 2004.12088)."""

    V1 = "v1"
    """One server-half copy per client; copies are averaged (FedAvg) with the client halves."""
    V2 = "v2"
    """One server half, updated by every client's batches one at a time, in arrival order."""
    ALL: ClassVar[tuple[str, ...]] = (V1, V2)

    @classmethod
    def validate(cls, variant: str) -> str:
        """Return ``variant`` normalised to lower case, or raise with the accepted names."""
        normalised = str(variant).lower().removeprefix("sfl")
        if normalised not in cls.ALL:
            raise ValueError(f"variant must be one of {', '.join(cls.ALL)}; got {variant!r}")
        return normalised


@dataclass(frozen=True)
class OptimizerConfig:
    """How to build the optimizer of one half.

    Parameters
    ----------
    name : str (default: "sgd")
        ``"sgd"`` or ``"adam"``.
    lr : float (default: 0.05)
        Learning rate.
    momentum : float (default: 0.0)
        SGD momentum; ignored by Adam.
    weight_decay : float (default: 0.0)
        L2 penalty.
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("sgd", "adam")

    def __post_init__(self) -> None:
        if self.name not in self.OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(self.OPTIMIZERS)}; got {self.name!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive; got lr={self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(
                f"momentum and weight decay must be >= 0; got {self.momentum}, {self.weight_decay}"
            )

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, prefix: str, default: OptimizerConfig | None = None
    ) -> OptimizerConfig:
        """Read ``<prefix>optimizer``, ``<prefix>lr``, ``<prefix>momentum``, ... from a run config.

        Keys that are absent keep their values in ``default`` (``OptimizerConfig()`` if None).
        ``prefix`` is ``"client-"`` or ``"server-"``.
        """
        keys = {"name": f"{prefix}optimizer"} | {
            f.name: f"{prefix}{f.name.replace('_', '-')}" for f in fields(cls) if f.name != "name"
        }
        values: dict[str, Any] = {}
        for attribute, key in keys.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if attribute == "name":
                values[attribute] = str(value).lower()
                continue
            try:
                values[attribute] = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"run-config key {key!r} should be a number, got {value!r}"
                ) from None
        return replace(default or cls(), **values)

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Return a new optimizer over ``params``."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def save_optimizer_state(optimizer: torch.optim.Optimizer) -> bytes:
    """Serialize an optimizer's state (tensors, numbers and lists only)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


def load_optimizer_state(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    """Restore a state made by :func:`save_optimizer_state`; nothing but tensors is unpickled."""
    optimizer.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
