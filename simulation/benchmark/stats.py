"""Repeated measurements, reported so that they cannot flatter: minimum, median, spread, load.

A figure is the minimum of its repeats (what the machine can do when nothing else runs), shown
with the median and the spread ``(max - min) / min`` of the repeats and the machine's load
average while they ran. A figure whose spread is above the noise bound is marked noisy, and so is
a ratio built from one; the README quotes only figures that are not.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["NOISE_BOUND", "Repeated", "machine", "ratio", "repeat"]

NOISE_BOUND = 0.15
"""A figure whose repeats spread more than this (relative to their minimum) is noisy."""


@dataclass
class Repeated:
    """One figure measured several times."""

    values: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    """The 1-minute load average after each repeat."""
    noise_bound: float = NOISE_BOUND

    def add(self, value: float) -> None:
        self.values.append(value)
        self.loads.append(os.getloadavg()[0])

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """``(max - min) / min`` of the repeats (0 for one repeat)."""
        low = self.min
        return (max(self.values) - low) / low if low > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return len(self.values) < 2 or self.spread > self.noise_bound

    @property
    def load(self) -> float:
        """The highest 1-minute load average seen while the repeats ran."""
        return max(self.loads) if self.loads else float("nan")

    def show(self, scale: float = 1.0, digits: int = 2) -> str:
        """``min (median, spread%)``, with a ``noisy`` mark when it is."""
        text = (
            f"{self.min * scale:.{digits}f} ({self.median * scale:.{digits}f}, "
            f"{100 * self.spread:.0f}%)"
        )
        return text + (" noisy" if self.noisy else "")

    def as_dict(self) -> dict[str, object]:
        return {
            "values": self.values,
            "min": self.min,
            "median": self.median,
            "spread": self.spread,
            "noisy": self.noisy,
            "load": self.load,
        }


def repeat(measure: Callable[[], float], repeats: int, *, warmup: int = 0) -> Repeated:
    """Call ``measure`` ``warmup`` times (discarded), then ``repeats`` times."""
    for _ in range(warmup):
        measure()
    result = Repeated()
    for _ in range(repeats):
        result.add(measure())
    return result


@dataclass
class Ratio:
    """A ratio of two figures' minimums; noisy when either side is."""

    numerator: Repeated
    denominator: Repeated

    @property
    def value(self) -> float:
        return self.numerator.min / self.denominator.min

    @property
    def noisy(self) -> bool:
        return self.numerator.noisy or self.denominator.noisy

    def show(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f}" + (" noisy" if self.noisy else "")


def ratio(numerator: Repeated, denominator: Repeated) -> Ratio:
    return Ratio(numerator, denominator)


def machine() -> str:
    """The CPU, its cores, the load average now, and the versions that matter."""
    import flwr  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    one, five, _ = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, flwr {flwr.__version__}; load average {one:.2f} (1 min), "
        f"{five:.2f} (5 min) at {time.strftime('%Y-%m-%d %H:%M')}"
    )
