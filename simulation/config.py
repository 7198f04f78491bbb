"""The app's run config: ``[tool.flwr.app.config]`` in pyproject.toml, read into one dataclass."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from splitfed import OptimizerConfig, PrivacyConfig, PrivacyConfigError, Variant
from splitfed.wire import COMPRESSIONS

__all__ = ["AGGREGATORS", "AppConfig"]

AGGREGATORS = ("fedavg", "fedprox", "fedmedian")
"""Flower strategies the app can merge client halves with (run-config key ``aggregator``)."""


@dataclass(frozen=True)
class AppConfig:
    """Every run-config key of the digits app; the README's run-config table documents them."""

    variant: str = Variant.V1
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    merge_every: int = 1
    cut: str = "pool"
    batch_norm: bool = False
    aggregator: str = "fedavg"
    proximal_mu: float = 0.0
    batch_size: int = 16
    local_epochs: int = 2
    reset_client_optimizer: bool = False
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0
    split_server_address: str = "127.0.0.1:0"
    split_server_advertised_address: str = ""
    split_server_insecure: bool = True
    split_server_certfile: str = ""
    split_server_keyfile: str = ""
    split_server_ca_certfile: str = ""
    output_dir: str = ""
    round_timeout: float = 600.0
    server_device: str = "cpu"
    label_private: bool = False
    server_cut: str = "relu3"
    smashed_clip_norm: float = 0.0
    smashed_noise_multiplier: float = 0.0
    nopeek_weight: float = 0.0
    label_noise_multiplier: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0
    privacy_delta: float = 1e-5
    data_plane_compression: str = "none"
    client_optimizer: OptimizerConfig = OptimizerConfig(momentum=0.9)
    server_optimizer: OptimizerConfig = OptimizerConfig(momentum=0.9)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant.validate(self.variant))
        problems = [
            f"{name}={value} must be at least 1"
            for name, value in (
                ("num-server-rounds", self.num_server_rounds),
                ("batch-size", self.batch_size),
                ("local-epochs", self.local_epochs),
                ("merge-every", self.merge_every),
            )
            if value < 1
        ]
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(f"fraction-train={self.fraction_train} must be in (0, 1]")
        if self.aggregator not in AGGREGATORS:
            problems.append(
                f"aggregator={self.aggregator!r} must be one of {', '.join(AGGREGATORS)}"
            )
        if self.partitioner not in ("iid", "dirichlet"):
            problems.append(f"partitioner={self.partitioner!r} must be 'iid' or 'dirichlet'")
        if not self.dirichlet_alpha > 0:
            problems.append(f"dirichlet-alpha={self.dirichlet_alpha} must be positive")
        if not self.round_timeout > 0:
            problems.append(f"round-timeout={self.round_timeout} must be positive (seconds)")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", self.server_device):
            problems.append(
                f"server-device={self.server_device!r} must be 'cpu', 'cuda', 'cuda:N', 'mps' "
                "or 'auto' (cuda when available)"
            )
        if self.data_plane_compression not in COMPRESSIONS:
            problems.append(
                f"data-plane-compression={self.data_plane_compression!r} must be one of "
                f"{', '.join(repr(c) for c in COMPRESSIONS)}"
            )
        tls_files = {
            "split-server-certfile": self.split_server_certfile,
            "split-server-keyfile": self.split_server_keyfile,
            "split-server-ca-certfile": self.split_server_ca_certfile,
        }
        if self.split_server_insecure and any(tls_files.values()):
            problems.append(
                "split-server-insecure=true ignores the TLS files given; set "
                "split-server-insecure=false to serve TLS with them"
            )
        missing = [key for key, path in tls_files.items() if not path]
        if not self.split_server_insecure and missing:
            problems.append(
                f"split-server-insecure=false needs {', '.join(missing)} (PEM files on the "
                "machine that runs the ServerApp)"
            )
        try:
            self.privacy().validate(label_private=self.label_private)
        except PrivacyConfigError as err:
            problems.append(str(err))
        if self.batch_norm and self.privacy().dp_sgd:
            problems.append(
                "DP-SGD (dp-noise-multiplier) cannot run with batch-norm=true: BatchNorm mixes "
                "the examples of a batch; set batch-norm=false"
            )
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    def privacy(self) -> PrivacyConfig:
        """The client-side defenses this run config asks for."""
        return PrivacyConfig(
            smashed_clip_norm=self.smashed_clip_norm,
            smashed_noise_multiplier=self.smashed_noise_multiplier,
            nopeek_weight=self.nopeek_weight,
            label_noise_multiplier=self.label_noise_multiplier,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_max_grad_norm=self.dp_max_grad_norm,
            delta=self.privacy_delta,
        )

    def fingerprint(self) -> str:
        """Identifies what a checkpoint depends on: every key but the output folder and the
        number of rounds (a run may be resumed to train longer)."""
        relevant = replace(self, output_dir="", num_server_rounds=1)
        return hashlib.sha256(repr(relevant).encode()).hexdigest()[:16]

    def resolved_server_device(self) -> str:
        """``server-device`` with ``auto`` resolved; refuses a device this machine lacks."""
        import torch  # noqa: PLC0415 - keeps the config importable without loading torch

        if self.server_device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.server_device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"server-device={self.server_device!r} but this machine has no CUDA device; "
                "use server-device='cpu' or 'auto'"
            )
        if self.server_device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("server-device='mps' but MPS is not available; use 'cpu' or 'auto'")
        return self.server_device

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Build from a Flower run config; unknown keys are refused, absent ones default."""
        optimizer_keys = {
            f"{side}-{key}"
            for side in ("client", "server")
            for key in ("optimizer", "lr", "momentum", "weight-decay")
        }
        simple = {f.name for f in fields(cls)} - {"client_optimizer", "server_optimizer"}
        unknown = set(run_config) - optimizer_keys - {n.replace("_", "-") for n in simple}
        if unknown:
            raise ValueError(
                f"unknown run-config keys: {sorted(unknown)}; the keys are listed under "
                "[tool.flwr.app.config] in pyproject.toml"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if f.name in simple and key in run_config:
                values[f.name] = _coerce(key, run_config[key], type(f.default))
        return cls(
            **values,
            client_optimizer=OptimizerConfig.from_run_config(
                run_config, prefix="client-", default=cls.client_optimizer
            ),
            server_optimizer=OptimizerConfig.from_run_config(
                run_config, prefix="server-", default=cls.server_optimizer
            ),
        )


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a run-config value to ``kind``; refuse anything that would lose information."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is bool and str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    if kind is int and not isinstance(value, bool):
        if isinstance(value, int) or isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if kind is str and isinstance(value, str | int):
        return str(value)
    raise ValueError(f"run-config key {key!r} should be {kind.__name__}, got {value!r}")
