"""Small configs shared by the client and the server side."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

__all__ = [
    "OptimizerConfig",
    "ServerCopies",
    "Variant",
    "load_optimizer_state",
    "save_optimizer_state",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""A torch optimizer class, or any callable ``(params, **kwargs) -> Optimizer``."""


class Variant:
    """The variants: SFLV1 and SFLV2 as named in Thapa et al. (arXiv 2004.12088), and split
    learning on local losses (Han et al. 2021; CSE-FSL, arXiv 2302.05599)."""

    V1 = "v1"
    """One server-half copy per client; copies are averaged (FedAvg) with the client halves."""
    V2 = "v2"
    """One server half, updated by every client's batches one at a time, in arrival order."""
    LOCAL_LOSS = "local-loss"
    """Each client trains its half on the loss of a small auxiliary head of its own and streams
    activations and labels to the split server without waiting; no gradient comes back. The
    server half is one shared half or one copy per client (:class:`ServerCopies`)."""
    ALL: ClassVar[tuple[str, ...]] = (V1, V2, LOCAL_LOSS)

    @classmethod
    def validate(cls, variant: str) -> str:
        """Return ``variant`` normalised to lower case, or raise with the accepted names."""
        normalised = str(variant).lower().removeprefix("sfl")
        if normalised not in cls.ALL:
            raise ValueError(f"variant must be one of {', '.join(cls.ALL)}; got {variant!r}")
        return normalised

    @classmethod
    def describe(cls, variant: str, server_copies: str | None = None) -> str:
        """A short name for logs and titles: ``"SFLV1"``, ``"SFLV2"``, ``"local-loss (shared
        server half)"``."""
        if variant == cls.LOCAL_LOSS:
            per_client = server_copies == ServerCopies.PER_CLIENT
            copies = "a server half per client" if per_client else "shared server half"
            return f"local-loss ({copies})"
        return f"SFL{variant.upper()}"


class ServerCopies:
    """How the split server keeps the server half in the local-loss variant."""

    SHARED = "shared"
    """One server half and optimizer, trained on every client's batches in arrival order (as
    SFLV2). The server holds one half whatever the number of clients."""
    PER_CLIENT = "per-client"
    """One copy and optimizer per client, averaged with FedAvg when the round merges (as
    SFLV1): clients train in parallel, and the server holds one copy per client of a round."""
    ALL: ClassVar[tuple[str, ...]] = (SHARED, PER_CLIENT)

    @classmethod
    def validate(cls, server_copies: str) -> str:
        """Return ``server_copies`` if it is one of :attr:`ALL`; raise with them otherwise."""
        if server_copies not in cls.ALL:
            raise ValueError(
                f"server_copies must be one of {', '.join(map(repr, cls.ALL))}; got "
                f"{server_copies!r}"
            )
        return server_copies


class OptimizerConfig:
    """How to build the optimizer of one half: any torch optimizer, with its keyword arguments.

    ``OptimizerConfig(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)`` builds
    ``torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)`` for each half that needs one. The
    arguments are checked at once by building the optimizer over a throwaway parameter, so a
    mistake is reported where the config is written, not on the first batch of a round.

    Parameters
    ----------
    optimizer : type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] \
(default: torch.optim.SGD)
        The optimizer class, or a factory called as ``optimizer(params, **kwargs)``.
    **kwargs
        Its keyword arguments (default: ``lr=0.05`` for the default SGD).
    """

    def __init__(self, optimizer: OptimizerFactory = torch.optim.SGD, /, **kwargs: Any) -> None:
        if not callable(optimizer):
            raise TypeError(
                f"optimizer must be a torch optimizer class or a factory, got {optimizer!r}; "
                "e.g. OptimizerConfig(torch.optim.SGD, lr=0.05)"
            )
        if optimizer is torch.optim.SGD and not kwargs:
            kwargs = {"lr": 0.05}
        self.optimizer = optimizer
        self.kwargs: dict[str, Any] = dict(kwargs)
        try:
            self.build([torch.nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self!r} cannot be built: {err}") from err

    @property
    def name(self) -> str:
        """The optimizer's name, e.g. ``"SGD"``."""
        return getattr(self.optimizer, "__name__", type(self.optimizer).__name__)

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Return a new optimizer over ``params``."""
        return self.optimizer(params, **self.kwargs)

    def __repr__(self) -> str:
        arguments = "".join(f", {key}={value!r}" for key, value in sorted(self.kwargs.items()))
        return f"OptimizerConfig({self.name}{arguments})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OptimizerConfig):
            return NotImplemented
        return self.optimizer is other.optimizer and self.kwargs == other.kwargs

    def __hash__(self) -> int:
        return hash((self.optimizer, tuple(sorted(self.kwargs.items()))))


def save_optimizer_state(optimizer: torch.optim.Optimizer) -> bytes:
    """Serialize an optimizer's state (tensors, numbers and lists only)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


def load_optimizer_state(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    """Restore a state made by :func:`save_optimizer_state`; nothing but tensors is unpickled."""
    optimizer.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
