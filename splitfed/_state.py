"""Leaving a caller's modules and random state as they were: the probes, evaluations and
attacks that run someone else's model put back what they touch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def modes_kept(*modules: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Put ``modules`` in training (``True``) or eval (``False``) mode, or leave them (``None``),
    and afterwards give every submodule back its own mode: a frozen BatchNorm inside a model in
    training mode stays frozen (``module.train(mode)`` would unfreeze it)."""
    saved = {sub: sub.training for module in modules for sub in module.modules()}
    if training is not None:
        for module in modules:
            module.train(training)
    try:
        yield
    finally:
        for sub, mode in saved.items():
            sub.training = mode


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run with the CPU generator (and ``device``'s, for a CUDA device) seeded with ``seed``, and
    restore them afterwards. Only those: ``torch.manual_seed`` would also reseed every
    accelerator's generator, for good."""
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
