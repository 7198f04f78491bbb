"""Opt-in defenses for what crosses the data plane, and their accounting.

Split learning sends each example's cut-layer activations (smashed data) to the split server, and
in the label-private split the gradient of the client's loss; both leak. The defenses here are
applied on the client, before anything leaves it:

- **clipped Gaussian noise on smashed data**: each example's activation vector is clipped to norm
  ``C`` and ``N(0, sigma^2 C^2)`` noise is added. Any two inputs give clipped activations at most
  ``2C`` apart, so one release is the Gaussian mechanism with ``mu = 2 / sigma``; ``k`` releases of
  an example compose exactly to ``mu = 2 sqrt(k) / sigma`` (Gaussian differential privacy, Dong,
  Roth and Su 2019), converted to ``(epsilon, delta)`` exactly with the analytic Gaussian
  mechanism (Balle and Wang 2018). Noise without clipping is refused: the client half learns to
  scale its activations up past it.
- **NoPeek**: a penalty on the bias-corrected distance correlation between inputs and smashed
  data in the client's loss. It lowers the statistic; it is a heuristic, not a guarantee.
- **label protection** (label-private split): each example's gradient at the server half's output
  is rescaled to the batch's mean gradient norm (so norms no longer tell examples apart; a
  variant of Li et al. 2022's "max norm", which pads up to the largest norm and made training
  collapse here), then isotropic noise of ``multiplier x`` that mean norm is added. No formal
  guarantee.
- **DP-SGD on the client half** (Opacus): per-example gradient clipping and noise on the client
  half's update, which is what reaches the aggregator.

All of them draw from the client's own randomness, :class:`ClientSecret`: a secret the server
cannot derive (from the node's config, or created once per client from the operating system and
kept in its ``Context.state``), which also orders the client's batches. A batch order or a noise
draw the server can derive links every release of an example and lets it subtract the noise.

:meth:`PrivacyConfig.validate` refuses the settings that would silently give no protection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cut import SplitModel

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = [
    "ClientSecret",
    "PrivacyConfig",
    "PrivacyConfigError",
    "analytic_gaussian_epsilon",
    "clip_and_noise",
    "distance_correlation",
    "dp_sgd_epsilon",
    "make_client_half_private",
    "protect_output_gradient",
    "smashed_data_epsilon",
]

logger = logging.getLogger("flwr_splitfed")

SAFE_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
"""Opacus modes that compute exact per-example gradients from an outside gradient. Opacus'
``"ghost"`` mode does no clipping in this setting while its accountant still reports an epsilon."""


class PrivacyConfigError(ValueError):
    """A privacy setting would give less protection than it claims."""


NODE_CONFIG_SECRET_KEY = "client-secret"
"""The SuperNode ``--node-config`` key :meth:`ClientSecret.from_context` reads a secret from."""
STATE_SECRET_KEY = "splitfed.client-secret"
"""Where :meth:`ClientSecret.from_context` keeps a secret it created, in ``Context.state``."""
MIN_SECRET_CHARACTERS = 16


@dataclass(frozen=True, repr=False)
class ClientSecret:
    """A client's private randomness: what orders its batches and draws its noise.

    Every stream of random numbers is derived from ``key`` and a purpose (``"shuffle"``,
    ``"noise"``, ...) and round with HMAC-SHA256, so the streams are independent of one
    another and of anything the server knows. The same key reproduces a client's run exactly;
    without the key the server cannot reproduce a batch order or a noise draw, even knowing the
    run config, the round and the client's partition.

    Parameters
    ----------
    key : bytes
        At least 16 bytes of secret; :meth:`from_context` or :meth:`from_value` make one.
    """

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) < 16:
            raise ValueError(
                "a ClientSecret needs a key of at least 16 bytes: use ClientSecret.generate(), "
                "ClientSecret.from_value(...) or ClientSecret.from_context(context)"
            )

    def __repr__(self) -> str:  # never print the key
        return "ClientSecret(<hidden>)"

    @classmethod
    def generate(cls) -> ClientSecret:
        """A fresh secret from the operating system's randomness."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_value(cls, value: str | bytes | int) -> ClientSecret:
        """A secret derived from ``value`` (a SuperNode's configured secret, a test's seed).

        Reproducible: the same value gives the same secret. It is exactly as secret as
        ``value``: a short or guessable value (a small integer, a word) can be found by a server
        that tries candidates against the batch orders it sees.
        """
        raw = value if isinstance(value, bytes) else str(value).encode()
        return cls(hashlib.sha256(b"splitfed.client-secret\x00" + raw).digest())

    @classmethod
    def from_context(
        cls, context: Context, *, node_config_key: str = NODE_CONFIG_SECRET_KEY
    ) -> ClientSecret:
        """This node's secret: from its node config if set there, otherwise the one kept in its
        ``Context.state``, created from the operating system's randomness on first use.

        Set ``--node-config "client-secret='...'"`` on a SuperNode for runs that can be
        reproduced; a value shorter than 16 characters is used with a loud warning. Neither the
        node config nor ``Context.state`` leaves the SuperNode.

        Parameters
        ----------
        context : Context
            The ClientApp's context.
        node_config_key : str (default: "client-secret")
            The node-config key read.
        """
        configured = context.node_config.get(node_config_key)
        if configured is not None and str(configured) != "":
            if len(str(configured)) < MIN_SECRET_CHARACTERS:
                logger.warning(
                    "PRIVACY: the node config's %r has fewer than %d characters; a server can "
                    "guess a short secret and reproduce this client's batch order and noise. "
                    "Use a long random value (python -c 'import secrets; "
                    "print(secrets.token_hex(16))')",
                    node_config_key,
                    MIN_SECRET_CHARACTERS,
                )
            return cls.from_value(str(configured))
        saved = context.state.config_records.get(STATE_SECRET_KEY)
        if saved is not None:
            return cls(bytes(saved["key"]))  # type: ignore[arg-type]
        from flwr.app import ConfigRecord

        created = cls.generate()
        context.state[STATE_SECRET_KEY] = ConfigRecord({"key": created.key})
        return created

    def seed(self, purpose: str, *indices: int) -> int:
        """A 63-bit seed for ``purpose`` (and e.g. the round), independent of every other."""
        message = ":".join([purpose, *map(str, indices)]).encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def generator(self, purpose: str, *indices: int) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with :meth:`seed`."""
        return torch.Generator().manual_seed(self.seed(purpose, *indices))


@dataclass(frozen=True)
class PrivacyConfig:
    """Which defenses a client applies; every one is off by default.

    Parameters
    ----------
    smashed_clip_norm : float (default: 0.0)
        Clip each example's activation vector to this L2 norm before it is sent; 0 is off.
    smashed_noise_multiplier : float (default: 0.0)
        Add ``N(0, (multiplier * smashed_clip_norm)^2)`` to each clipped activation; needs
        ``smashed_clip_norm > 0``.
    nopeek_weight : float (default: 0.0)
        Weight of the distance-correlation penalty (NoPeek) in the client's loss; 0 is off.
    label_noise_multiplier : float (default: 0.0)
        Label-private split only: rescale each example's gradient at the server half's output to
        the batch's mean norm, then add isotropic noise of this many times that norm; 0 is off.
    dp_noise_multiplier : float (default: 0.0)
        DP-SGD on the client half (Opacus): noise standard deviation over ``dp_max_grad_norm``.
    dp_max_grad_norm : float (default: 0.0)
        DP-SGD: per-example gradient norm bound of the client half.
    delta : float (default: 1e-5)
        The delta at which epsilons are reported.
    grad_sample_mode : str (default: "hooks")
        Opacus' per-example gradient mode: ``"hooks"``, ``"functorch"`` or ``"ew"``.
    """

    smashed_clip_norm: float = 0.0
    smashed_noise_multiplier: float = 0.0
    nopeek_weight: float = 0.0
    label_noise_multiplier: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0
    delta: float = 1e-5
    grad_sample_mode: str = "hooks"

    @property
    def enabled(self) -> bool:
        """Whether any defense is on."""
        return any(
            getattr(self, f.name) > 0
            for f in fields(self)
            if f.name not in ("delta", "grad_sample_mode")
        )

    @property
    def dp_sgd(self) -> bool:
        """Whether DP-SGD runs on the client half."""
        return self.dp_noise_multiplier > 0 or self.dp_max_grad_norm > 0

    def validate(
        self,
        *,
        label_private: bool = False,
        client_half: nn.Module | None = None,
        server_loss_reduction: str = "mean",
        local_loss: bool = False,
    ) -> None:
        """Raise :class:`PrivacyConfigError` listing every problem and its fix; warn loudly
        about settings that are legal but weaker than they look.

        Parameters
        ----------
        label_private : bool (default: False)
            Whether the client runs the label-private (U-shaped) split.
        client_half : nn.Module | None (default: None)
            The client half, checked for layers DP-SGD cannot handle (BatchNorm).
        server_loss_reduction : str (default: "mean")
            How the split server's loss reduces over a batch; DP-SGD assumes a mean.
        local_loss : bool (default: False)
            Whether the client trains in the local-loss variant (an auxiliary head, labels sent
            to the split server, no gradient back).
        """
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                problems.append(f"{f.name}={value} must be a finite number >= 0")
        if not 0 < self.delta < 1:
            problems.append(f"delta={self.delta} must be in (0, 1), e.g. 1e-5")
        if self.smashed_noise_multiplier > 0 and self.smashed_clip_norm <= 0:
            problems.append(
                "smashed_noise_multiplier without smashed_clip_norm protects nothing: the client "
                "half learns to scale its activations up until the noise does not matter. Set "
                "smashed_clip_norm (e.g. 1.0) as well"
            )
        if self.label_noise_multiplier > 0 and local_loss:
            problems.append(
                "label_noise_multiplier does not apply to local-loss training: the labels go to "
                "the split server with the activations and no gradient leaves the client; set "
                "label_noise_multiplier=0"
            )
        elif self.label_noise_multiplier > 0 and not label_private:
            problems.append(
                "label_noise_multiplier protects labels in the label-private split only (in the "
                "plain split the labels themselves go to the server); cut the model with a "
                "server_cut (split_model(..., server_cut=...)) or set label_noise_multiplier=0"
            )
        if self.dp_sgd:
            if self.dp_noise_multiplier <= 0 or self.dp_max_grad_norm <= 0:
                problems.append(
                    "DP-SGD needs both dp_noise_multiplier > 0 and dp_max_grad_norm > 0: "
                    "clipping without noise, or noise without a bound, gives no guarantee"
                )
            if self.grad_sample_mode not in SAFE_GRAD_SAMPLE_MODES:
                problems.append(
                    f"grad_sample_mode={self.grad_sample_mode!r}: use one of "
                    f"{', '.join(SAFE_GRAD_SAMPLE_MODES)}. Opacus' ghost clipping does not clip a "
                    "client half fed an outside gradient, while its accountant still reports an "
                    "epsilon"
                )
            if server_loss_reduction != "mean":
                problems.append(
                    f"the split server's loss reduces by {server_loss_reduction!r}, DP-SGD "
                    "assumes a mean over the batch: per-example gradients would be off by the "
                    "batch size and the clipping bound meaningless. Give the server a loss with "
                    "reduction='mean' (nn.CrossEntropyLoss() is)"
                )
            if self.nopeek_weight > 0:
                problems.append(
                    "NoPeek couples the examples of a batch, so per-example gradients (and "
                    "DP-SGD's guarantee) do not exist; turn off one of nopeek_weight and DP-SGD"
                )
            if label_private:
                problems.append(
                    "DP-SGD covers the client half only, but in the label-private split the "
                    "client head reaches the aggregator too; turn off DP-SGD or cut the model "
                    "without a server_cut"
                )
            if local_loss:
                problems.append(
                    "DP-SGD covers the client half only, but in local-loss training the "
                    "auxiliary head reaches the aggregator too; turn off DP-SGD or train with "
                    "variant 'v1' or 'v2'"
                )
            if client_half is not None:
                problems.extend(_opacus_problems(client_half))
        if problems:
            raise PrivacyConfigError(
                "privacy settings refused:\n - " + "\n - ".join(problems)
            ) from None
        self._warn()

    def _warn(self) -> None:
        if self.smashed_clip_norm > 0 and self.smashed_noise_multiplier == 0:
            logger.warning(
                "PRIVACY: smashed_clip_norm without noise bounds the activations but gives no "
                "privacy guarantee; set smashed_noise_multiplier"
            )
        if self.smashed_noise_multiplier > 0:
            logger.warning(
                "PRIVACY: the smashed-data epsilon covers the activations sent to the split "
                "server only. The client half's weights reach the aggregator unprotected unless "
                "DP-SGD is on"
            )
        if self.nopeek_weight > 0:
            logger.warning(
                "PRIVACY: NoPeek lowers the distance correlation of inputs and smashed data; it "
                "gives no guarantee, and decoder attacks may still invert the activations"
            )
        if self.label_noise_multiplier > 0:
            logger.warning(
                "PRIVACY: label_noise_multiplier is a heuristic defense of labels with no formal "
                "guarantee; measure what the split server can infer before relying on it "
                "(norm and cosine attacks on the output gradients, docs/privacy.md)"
            )

    # -- the transforms the client applies -----------------------------------------------------

    def protect_smashed(
        self, activations: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Clip and noise ``activations`` as configured (the identity when off)."""
        if self.smashed_clip_norm <= 0:
            return activations
        return clip_and_noise(
            activations,
            clip_norm=self.smashed_clip_norm,
            noise_multiplier=self.smashed_noise_multiplier,
            generator=generator,
        )

    def protect_output_gradient(
        self, gradient: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise the gradient at the server half's output as configured (identity when off)."""
        if self.label_noise_multiplier <= 0:
            return gradient
        return protect_output_gradient(
            gradient, noise_multiplier=self.label_noise_multiplier, generator=generator
        )

    def epsilons(self, *, releases: int, dp_steps: int) -> dict[str, float]:
        """The ``(epsilon, delta)`` figures of this config after an example was sent
        ``releases`` times and took part in ``dp_steps`` DP-SGD steps."""
        out: dict[str, float] = {}
        if self.smashed_noise_multiplier > 0:
            out["smashed-epsilon-per-release"] = smashed_data_epsilon(
                noise_multiplier=self.smashed_noise_multiplier, delta=self.delta
            )
            out["smashed-epsilon"] = smashed_data_epsilon(
                noise_multiplier=self.smashed_noise_multiplier,
                delta=self.delta,
                releases=max(releases, 1),
            )
        if self.dp_noise_multiplier > 0:
            out["dp-epsilon"] = dp_sgd_epsilon(
                noise_multiplier=self.dp_noise_multiplier,
                delta=self.delta,
                steps_per_example=max(dp_steps, 1),
            )
        return out

    @contextlib.contextmanager
    def training(
        self,
        split: SplitModel,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int | None,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[SplitModel, torch.optim.Optimizer]]:
        """Train ``split``'s client parts with DP-SGD inside the block, when it is configured.

        Yields the split and the optimizer to train with: with DP-SGD, a split whose client half
        computes per-example gradients (Opacus, sharing the client half's parameters) and an
        optimizer that clips and noises them; without it, ``split`` and ``optimizer`` as they
        are. Leaving the block removes Opacus' hooks from the client half.

        Parameters
        ----------
        batch_size : int | None
            The expected batch size, which DP-SGD divides the noised sum by; needed with DP-SGD.
        generator : torch.Generator | None (default: None)
            Draws DP-SGD's noise (e.g. :meth:`ClientSecret.generator`); ``None``: torch's
            global generator.
        """
        if not self.dp_sgd:
            yield split, optimizer
            return
        if not batch_size:
            raise ValueError(
                "DP-SGD needs the expected batch size: pass a torch DataLoader with a batch_size"
            )
        module, private_optimizer = make_client_half_private(
            client_half=split.client_half,
            optimizer=optimizer,
            noise_multiplier=self.dp_noise_multiplier,
            max_grad_norm=self.dp_max_grad_norm,
            expected_batch_size=batch_size,
            grad_sample_mode=self.grad_sample_mode,
            generator=generator,
        )
        try:
            yield dataclasses.replace(split, client_half=module), private_optimizer
        finally:
            module.remove_hooks()  # type: ignore[operator]


def _opacus_problems(module: nn.Module) -> list[str]:
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    return [
        f"DP-SGD cannot use the client half as it is: {err}. BatchNorm mixes the examples of a "
        "batch; build the model without it or replace it with "
        "GroupNorm (opacus.validators.ModuleValidator.fix)"
        for err in errors
    ]


def clip_and_noise(
    activations: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip each example's activation vector to L2 norm ``clip_norm``, then add
    ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate.

    Differentiable in ``activations``: the client half learns through the clipping.
    """
    flat = activations.flatten(1)
    norms = flat.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
    clipped = (flat * scale).view_as(activations)
    if noise_multiplier <= 0:
        return clipped
    noise = torch.randn(
        activations.shape, generator=generator, dtype=activations.dtype, device="cpu"
    ).to(activations.device)
    return clipped + noise * (noise_multiplier * clip_norm)


def protect_output_gradient(
    gradient: torch.Tensor,
    *,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rescale each example's gradient to the batch's mean norm (so norms no longer tell
    examples apart), then add isotropic Gaussian noise of expected norm ``noise_multiplier``
    times that mean norm (so directions tell less).

    Rescaling to the mean rather than padding to the largest norm keeps the noise in proportion
    to a typical example: padding with noise up to the largest norm drowned the small gradients
    of well-classified examples and made training collapse (docs/privacy.md).
    """
    flat = gradient.flatten(1)
    norms = flat.norm(dim=1, keepdim=True)
    target = norms.mean()
    # Nearly vanished gradients are scaled up by at most 1000: never past the mean norm, and
    # never by factors that overflow.
    rescaled = flat * (target / norms.clamp(min=1e-3 * target + torch.finfo(flat.dtype).tiny))
    noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device="cpu").to(
        flat.device
    )
    std = noise_multiplier * target / flat.shape[1] ** 0.5
    protected: torch.Tensor = (rescaled + noise * std).view_as(gradient)
    return protected


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bias-corrected distance correlation of two batches (Szekely and Rizzo 2014).

    This is the unbiased estimator built from U-centered distance matrices, of the squared
    distance correlation (the statistic ``dcor.u_distance_correlation_sqr`` computes).

    Rows are examples; each is flattened. Distances are Euclidean (not squared, which would only
    see linear dependence). The estimate is about 0 for independent data at any batch size, 1 for
    data related by a similarity, and may dip slightly below 0. Needs at least 4 examples.
    Differentiable, so it serves as the NoPeek penalty.
    """
    n = x.shape[0]
    if n < 4 or y.shape[0] != n:
        raise ValueError(f"distance correlation needs two batches of the same size >= 4; got {n}")
    a = _u_centered(_distances(x.flatten(1).double()))
    b = _u_centered(_distances(y.flatten(1).double()))
    scale = 1.0 / (n * (n - 3))
    dcov = (a * b).sum() * scale
    dvar_x, dvar_y = (a * a).sum() * scale, (b * b).sum() * scale
    denominator = (dvar_x * dvar_y).clamp(min=1e-24).sqrt()
    return (dcov / denominator).to(x.dtype if x.is_floating_point() else torch.float32)


def _distances(z: torch.Tensor) -> torch.Tensor:
    squared = (z.unsqueeze(1) - z.unsqueeze(0)).pow(2).sum(-1)
    # The epsilon keeps the gradient of the square root finite on the diagonal.
    return (squared + 1e-18).sqrt() * (1 - torch.eye(len(z), dtype=z.dtype, device=z.device))


def _u_centered(d: torch.Tensor) -> torch.Tensor:
    n = d.shape[0]
    rows = d.sum(dim=1, keepdim=True) / (n - 2)
    cols = d.sum(dim=0, keepdim=True) / (n - 2)
    total = d.sum() / ((n - 1) * (n - 2))
    centered = d - rows - cols + total
    return centered * (1 - torch.eye(n, dtype=d.dtype, device=d.device))


# -- accounting -------------------------------------------------------------------------------


def analytic_gaussian_epsilon(*, mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity over noise std ``mu`` at
    ``delta`` (Balle and Wang 2018, Theorem 8).

    Solves ``Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2) = delta`` for ``eps``.
    """
    from scipy.special import log_ndtr

    if not mu > 0 or not 0 < delta < 1:
        raise ValueError(f"need mu > 0 and 0 < delta < 1; got mu={mu}, delta={delta}")

    def delta_of(eps: float) -> float:
        first = math.exp(log_ndtr(-eps / mu + mu / 2))
        second = math.exp(eps + log_ndtr(-eps / mu - mu / 2))
        return first - second

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_of(middle) > delta else (low, middle)
    return high


def smashed_data_epsilon(*, noise_multiplier: float, delta: float, releases: int = 1) -> float:
    """Epsilon of ``releases`` clipped-and-noised releases of one example's activations.

    Two inputs give clipped activations at most ``2C`` apart and the noise std is
    ``noise_multiplier * C``, so each release has ``mu = 2 / noise_multiplier``; ``k`` releases
    compose exactly to ``mu * sqrt(k)``.
    """
    return analytic_gaussian_epsilon(mu=2.0 * math.sqrt(releases) / noise_multiplier, delta=delta)


def dp_sgd_epsilon(*, noise_multiplier: float, delta: float, steps_per_example: int) -> float:
    """Epsilon of DP-SGD for an example that took part in ``steps_per_example`` steps.

    Batches are a shuffled partition (no Poisson sampling, so no amplification is claimed):
    each step that holds the example is a Gaussian mechanism with ``mu = 1 / noise_multiplier``
    (add or remove one example), composed exactly over the steps.
    """
    return analytic_gaussian_epsilon(
        mu=math.sqrt(steps_per_example) / noise_multiplier, delta=delta
    )


def make_client_half_private(
    *,
    client_half: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    grad_sample_mode: str = "hooks",
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Wrap ``client_half`` and ``optimizer`` for DP-SGD with Opacus.

    Returns a module that computes per-example gradients (it shares ``client_half``'s
    parameters; call ``remove_hooks()`` on it when done) and an optimizer that clips each
    example's gradient to ``max_grad_norm``, sums, adds ``N(0, (noise_multiplier *
    max_grad_norm)^2)`` and divides by ``expected_batch_size``: the mean-reduced loss the split
    server uses. Refuses ghost clipping and BatchNorm. ``generator`` draws the noise (default:
    torch's global generator).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    PrivacyConfig(
        dp_noise_multiplier=noise_multiplier,
        dp_max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode,
    ).validate(client_half=client_half)
    module = (
        GradSampleModule(
            client_half,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            force_functorch=grad_sample_mode == "functorch",
        )
        if grad_sample_mode != "ew"
        else _ew_module(client_half)
    )
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    return module, private_optimizer


def _ew_module(client_half: nn.Module) -> nn.Module:
    from opacus.grad_sample import GradSampleModuleExpandedWeights

    module: nn.Module = GradSampleModuleExpandedWeights(
        client_half, batch_first=True, loss_reduction="mean"
    )
    return module
