"""The app's run config: ``[tool.flwr.app.config]`` in pyproject.toml, read into one dataclass.

The defaults are written once, in that table (Flower reads it too); :class:`AppConfig` takes its
field defaults from it. The library speaks of its API's arguments (``smashed_clip_norm``,
``tls=``); this module translates its errors to the run-config keys a user of the app sets.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from splitfed import OptimizerConfig, PrivacyConfig, PrivacyConfigError, ServerCopies, Variant
from splitfed.monitor import LEAKAGE_ACTIONS
from splitfed.strategies.splitfed import CLIENT_HEADS
from splitfed.wire import COMPRESSIONS

from .datasets import DataConfigError
from .fedavg import FEDAVG
from .models import AUX_HEADS, MODELS
from .task import data_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - flwr depends on tomli
    import tomli as tomllib

__all__ = ["AGGREGATORS", "CLIENT_RANDOMNESS", "OPTIMIZERS", "AppConfig", "app_config_defaults"]

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
"""The app's pyproject.toml: in the repository and in the FAB Flower builds from it alike."""

AGGREGATORS = ("fedavg", "fedprox", "fedmedian")
"""Flower strategies the app can merge client halves with (run-config key ``aggregator``)."""

CLIENT_RANDOMNESS = ("private", "from-seed")
"""Where a client's batch order and noise come from (run-config key ``client-randomness``):
its own secret, or the run config's seed and its partition (reproducible, and derivable by the
server)."""

_WATCHING_ONLY = {
    "leakage_monitor": False,
    "leakage_threshold": 1.0,
    "leakage_label_threshold": 1.0,
    "leakage_action": "warn",
    "leakage_every": 1,
    "leakage_steps": 1,
}
"""Keys that watch a run without changing its training: a resumed run may change them."""

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""Optimizers the run config names (``client-optimizer``, ``server-optimizer``)."""

_OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "weight-decay")


def app_config_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml: every key and its default."""
    with PYPROJECT.open("rb") as file:
        return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])


_DEFAULTS = app_config_defaults()


def _default(key: str) -> Any:
    return field(default=_DEFAULTS[key])


def optimizer_config(run_config: Mapping[str, Any], *, prefix: str) -> OptimizerConfig:
    """The optimizer ``<prefix>optimizer``, ``<prefix>lr``, ... name, absent keys defaulting.

    SGD takes the learning rate, momentum and weight decay; Adam and AdamW ignore the momentum.
    """
    values = {key: run_config.get(prefix + key, _DEFAULTS[prefix + key]) for key in _OPTIMIZER_KEYS}
    name = str(values["optimizer"]).lower()
    if name not in OPTIMIZERS:
        raise ValueError(
            f"{prefix}optimizer={values['optimizer']!r} must be one of {', '.join(OPTIMIZERS)}"
        )
    numbers = {}
    for key in _OPTIMIZER_KEYS[1:]:
        try:
            numbers[key] = float(values[key])
        except (TypeError, ValueError):
            raise ValueError(
                f"run-config key {prefix + key!r} should be a number, got {values[key]!r}"
            ) from None
    if not numbers["lr"] > 0 or numbers["momentum"] < 0 or numbers["weight-decay"] < 0:
        raise ValueError(
            f"{prefix}lr must be positive and {prefix}momentum and {prefix}weight-decay at least "
            f"0; got {numbers['lr']}, {numbers['momentum']}, {numbers['weight-decay']}"
        )
    kwargs = {"lr": numbers["lr"], "weight_decay": numbers["weight-decay"]}
    if name == "sgd":
        kwargs["momentum"] = numbers["momentum"]
    return OptimizerConfig(OPTIMIZERS[name], **kwargs)


@dataclass(frozen=True)
class AppConfig:
    """Every run-config key of the app; the README's run-config table documents them."""

    variant: str = _default("variant")
    num_server_rounds: int = _default("num-server-rounds")
    fraction_train: float = _default("fraction-train")
    min_train_nodes: int = _default("min-train-nodes")
    fraction_evaluate: float = _default("fraction-evaluate")
    min_evaluate_nodes: int = _default("min-evaluate-nodes")
    merge_every: int = _default("merge-every")
    send_every: int = _default("send-every")
    aux_head: str = _default("aux-head")
    server_copies: str = _default("server-copies")
    dataset: str = _default("dataset")
    data_files: str = _default("data-files")
    data_dir: str = _default("data-dir")
    data_subset: str = _default("data-subset")
    input_key: str = _default("input-key")
    label_key: str = _default("label-key")
    image_size: int = _default("image-size")
    standardize: bool = _default("standardize")
    cache_dir: str = _default("cache-dir")
    model: str = _default("model")
    cut: str = _default("cut")
    batch_norm: bool = _default("batch-norm")
    aggregator: str = _default("aggregator")
    proximal_mu: float = _default("proximal-mu")
    batch_size: int = _default("batch-size")
    local_epochs: int = _default("local-epochs")
    reset_client_optimizer: bool = _default("reset-client-optimizer")
    partitioner: str = _default("partitioner")
    dirichlet_alpha: float = _default("dirichlet-alpha")
    classes_per_partition: int = _default("classes-per-partition")
    shards_per_partition: int = _default("shards-per-partition")
    test_fraction: float = _default("test-fraction")
    seed: int = _default("seed")
    split_server_address: str = _default("split-server-address")
    split_server_advertised_address: str = _default("split-server-advertised-address")
    split_server_insecure: bool = _default("split-server-insecure")
    split_server_certfile: str = _default("split-server-certfile")
    split_server_keyfile: str = _default("split-server-keyfile")
    split_server_ca_certfile: str = _default("split-server-ca-certfile")
    output_dir: str = _default("output-dir")
    round_timeout: float = _default("round-timeout")
    max_failed_rounds: int = _default("max-failed-rounds")
    server_device: str = _default("server-device")
    label_private: bool = _default("label-private")
    server_cut: str = _default("server-cut")
    client_heads: str = _default("client-heads")
    smashed_clip_norm: float = _default("smashed-clip-norm")
    smashed_noise_multiplier: float = _default("smashed-noise-multiplier")
    nopeek_weight: float = _default("nopeek-weight")
    label_noise_multiplier: float = _default("label-noise-multiplier")
    dp_noise_multiplier: float = _default("dp-noise-multiplier")
    dp_max_grad_norm: float = _default("dp-max-grad-norm")
    privacy_delta: float = _default("privacy-delta")
    client_randomness: str = _default("client-randomness")
    data_plane_compression: str = _default("data-plane-compression")
    leakage_monitor: bool = _default("leakage-monitor")
    leakage_threshold: float = _default("leakage-threshold")
    leakage_label_threshold: float = _default("leakage-label-threshold")
    leakage_action: str = _default("leakage-action")
    leakage_every: int = _default("leakage-every")
    leakage_steps: int = _default("leakage-steps")
    client_optimizer: OptimizerConfig = field(default=optimizer_config(_DEFAULTS, prefix="client-"))
    server_optimizer: OptimizerConfig = field(default=optimizer_config(_DEFAULTS, prefix="server-"))

    def __post_init__(self) -> None:
        if self.variant != FEDAVG:
            object.__setattr__(self, "variant", _validated_variant(self.variant))
        problems = [
            f"{name}={value} must be at least 1"
            for name, value in (
                ("num-server-rounds", self.num_server_rounds),
                ("batch-size", self.batch_size),
                ("local-epochs", self.local_epochs),
                ("merge-every", self.merge_every),
                ("send-every", self.send_every),
                ("max-failed-rounds", self.max_failed_rounds),
                ("leakage-every", self.leakage_every),
                ("leakage-steps", self.leakage_steps),
            )
            if value < 1
        ]
        problems.extend(self._local_loss_problems())
        if self.variant == FEDAVG and (self.label_private or self.privacy().enabled):
            problems.append(
                "variant='fedavg' trains the whole model on the clients, with no cut: "
                "label-private and the privacy defenses apply to SplitFed's variants only"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(f"fraction-train={self.fraction_train} must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            problems.append(f"fraction-evaluate={self.fraction_evaluate} must be in [0, 1]")
        if self.aggregator not in AGGREGATORS:
            problems.append(
                f"aggregator={self.aggregator!r} must be one of {', '.join(AGGREGATORS)}"
            )
        try:
            data_config(self).validate()
        except DataConfigError as err:
            problems.extend(err.problems)
        if self.model not in MODELS:
            problems.append(f"model={self.model!r} must be one of {', '.join(MODELS)}")
        if self.batch_norm and self.model != "cnn":
            problems.append("batch-norm=true applies to model='cnn' only")
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
            self.privacy().validate(
                label_private=self.label_private, local_loss=self.variant == Variant.LOCAL_LOSS
            )
        except PrivacyConfigError as err:
            problems.append(_in_run_config_words(str(err)))
        if self.client_randomness not in CLIENT_RANDOMNESS:
            problems.append(
                f"client-randomness={self.client_randomness!r} must be one of "
                f"{', '.join(map(repr, CLIENT_RANDOMNESS))}"
            )
        if self.client_heads not in CLIENT_HEADS:
            problems.append(
                f"client-heads={self.client_heads!r} must be one of "
                f"{', '.join(map(repr, CLIENT_HEADS))}"
            )
        elif self.client_heads == "local" and not self.label_private:
            problems.append(
                "client-heads='local' keeps the label-private split's client heads on the "
                "clients; set label-private=true, or leave client-heads='shared'"
            )
        elif self.client_heads == "local" and self.fraction_evaluate == 0:
            problems.append(
                "client-heads='local' leaves the ServerApp no whole model to evaluate: accuracy "
                "comes from federated evaluation, so fraction-evaluate must be above 0"
            )
        if self.leakage_monitor and self.variant == FEDAVG:
            problems.append(
                "leakage-monitor=true watches what crosses the cut; variant='fedavg' has none"
            )
        for key, share, what in (
            ("leakage-threshold", self.leakage_threshold, "examples re-identified"),
            ("leakage-label-threshold", self.leakage_label_threshold, "labels recovered"),
        ):
            if not 0.0 <= share <= 1.0:
                problems.append(
                    f"{key}={share} must be in [0, 1] (a share of {what}; 1.0 never warns)"
                )
        if self.leakage_label_threshold < 1.0 and not self.label_private:
            problems.append(
                "leakage-label-threshold applies to the label-private split (label-private="
                "true); the plain split sends the labels"
            )
        if self.leakage_action not in LEAKAGE_ACTIONS:
            problems.append(
                f"leakage-action={self.leakage_action!r} must be one of "
                f"{', '.join(map(repr, LEAKAGE_ACTIONS))}"
            )
        if self.batch_norm and self.privacy().dp_sgd:
            problems.append(
                "DP-SGD (dp-noise-multiplier) cannot run with batch-norm=true: BatchNorm mixes "
                "the examples of a batch; set batch-norm=false"
            )
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    def _local_loss_problems(self) -> list[str]:
        problems = []
        if self.aux_head not in AUX_HEADS:
            problems.append(f"aux-head={self.aux_head!r} must be one of {', '.join(AUX_HEADS)}")
        if self.server_copies not in ServerCopies.ALL:
            problems.append(
                f"server-copies={self.server_copies!r} must be one of "
                f"{', '.join(map(repr, ServerCopies.ALL))}"
            )
        if self.variant == Variant.LOCAL_LOSS:
            if self.label_private:
                problems.append(
                    "label-private=true cannot run with variant='local-loss', which sends the "
                    "labels to the split server; set label-private=false or variant 'v1' or 'v2'"
                )
            return problems
        if self.send_every != 1:
            problems.append(
                f"send-every={self.send_every} applies to variant='local-loss' only; "
                f"{self.variant} sends every batch"
            )
        if self.server_copies != ServerCopies.SHARED:
            problems.append(
                f"server-copies={self.server_copies!r} applies to variant='local-loss' only; "
                "v1 keeps a server half per client and v2 one shared half"
            )
        return problems

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
        """Identifies what a checkpoint depends on: every key but the output folder, the
        number of rounds (a run may be resumed to train longer) and the leakage monitor's."""
        relevant = replace(self, output_dir="", num_server_rounds=1, **_WATCHING_ONLY)
        return hashlib.sha256(repr(relevant).encode()).hexdigest()[:16]

    def resolved_server_device(self) -> str:
        """``server-device`` with ``auto`` resolved; refuses a device this machine lacks."""
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
        unknown = set(run_config) - set(_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown run-config keys: {sorted(unknown)}; the keys are listed under "
                "[tool.flwr.app.config] in pyproject.toml"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config and not isinstance(f.default, OptimizerConfig):
                values[f.name] = _coerce(key, run_config[key], type(f.default))
        try:
            optimizers = {
                f"{side}_optimizer": optimizer_config(run_config, prefix=f"{side}-")
                for side in ("client", "server")
            }
        except ValueError as err:
            raise ValueError(f"invalid run config: {err}") from None
        return cls(**values, **optimizers)


def _in_run_config_words(message: str) -> str:
    """A library error about :class:`PrivacyConfig`, in the app's run-config keys."""
    message = message.replace(
        "cut the model with a server_cut (split_model(..., server_cut=...))",
        "set label-private=true",
    ).replace(
        "turn off DP-SGD or cut the model without a server_cut",
        "turn off one of DP-SGD and label-private",
    )
    for f in fields(PrivacyConfig):
        key = "privacy-delta" if f.name == "delta" else f.name.replace("_", "-")
        message = re.sub(rf"\b{f.name}\b", key, message)
    return message


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


def _validated_variant(variant: str) -> str:
    """``variant`` normalised, or an error naming every variant the app runs."""
    try:
        return Variant.validate(variant)
    except ValueError:
        raise ValueError(
            f"invalid run config: variant={variant!r} must be one of "
            f"{', '.join((*Variant.ALL, FEDAVG))}"
        ) from None
