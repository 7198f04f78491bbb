"""Client-side defenses do what they claim, and settings that would protect nothing are refused."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from splitfed import PrivacyConfig, PrivacyConfigError, SplitModel, join_halves, run_local_epochs
from splitfed.dataplane import Exchange
from splitfed.privacy import (
    analytic_gaussian_epsilon,
    clip_and_noise,
    distance_correlation,
    make_client_half_private,
    protect_output_gradient,
    smashed_data_epsilon,
)
from tests.conftest import digits_batches


class LocalPlane:
    """A data plane that runs a server half in-process and records what it received."""

    def __init__(self, server_half: nn.Module) -> None:
        self.server_half = server_half
        self.received: list[torch.Tensor] = []

    def exchange(self, step, activations, labels) -> Exchange:
        self.received.append(activations.clone())
        leaf = activations.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(self.server_half(leaf), labels)
        loss.backward()
        return Exchange(cut_gradient=leaf.grad, loss=loss.item(), correct=0)

    def close(self) -> None:
        pass


def conv_halves(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    server = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return client, server


def as_split(client: nn.Module, server: nn.Module) -> SplitModel:
    return join_halves(client_half=client, server_half=server, sample_input=torch.zeros(2, 1, 8, 8))


# -- clipped Gaussian noise on smashed data ------------------------------------------------------


def test_clipping_bounds_every_example_and_leaves_small_ones_alone():
    activations = torch.randn(32, 8, 4, 4) * torch.logspace(-2, 3, 32).view(32, 1, 1, 1)
    clipped = clip_and_noise(activations, clip_norm=1.5, noise_multiplier=0.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert bool((norms <= 1.5 * (1 + 1e-6)).all())
    small = activations.flatten(1).norm(dim=1) < 1.5
    torch.testing.assert_close(clipped[small], activations[small])


def test_noise_has_standard_deviation_sigma_times_clip():
    activations = torch.zeros(200, 500)
    noised = clip_and_noise(
        activations, clip_norm=2.0, noise_multiplier=0.3, generator=torch.Generator().manual_seed(0)
    )
    assert noised.std().item() == pytest.approx(0.6, rel=0.01)


def test_what_reaches_the_split_server_is_clipped_even_if_the_client_half_scales_up():
    client, server = conv_halves()
    with torch.no_grad():
        client[0].weight.mul_(1000.0)  # a client half that learned to shout past the noise
    plane = LocalPlane(server)
    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.0)
    run_local_epochs(
        split=as_split(client, server),
        data_plane=plane,
        train_loader=digits_batches(0, 64, batch_size=16),
        optimizer=torch.optim.SGD(client.parameters(), lr=0.01),
        privacy=privacy,
    )
    norms = torch.cat([a.flatten(1).norm(dim=1) for a in plane.received])
    assert bool((norms <= 1.0 + 1e-5).all()) and norms.max() > 0.99


# -- accounting ----------------------------------------------------------------------------------


def test_epsilon_matches_the_analytic_gaussian_mechanism():
    # mu = 1 at delta = 1e-5: 4.3772 (Balle and Wang 2018, Theorem 8, solved numerically); the
    # textbook bound sqrt(2 ln(1.25/delta)) / sigma would claim 4.84 and is invalid above 1.
    epsilon = analytic_gaussian_epsilon(mu=1.0, delta=1e-5)
    assert epsilon == pytest.approx(4.3772, abs=1e-4)
    # It solves the mechanism's exact privacy profile.
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    delta = phi(-epsilon + 0.5) - math.exp(epsilon) * phi(-epsilon - 0.5)
    assert delta == pytest.approx(1e-5, rel=1e-6)


def test_epsilon_agrees_with_opacus_prv_accountant_over_composed_releases():
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=4.0, sample_rate=1.0)
    expected = accountant.get_epsilon(delta=1e-5, eps_error=0.01)
    # Ten releases with sensitivity 2C and noise 8C: ten mechanisms of noise multiplier 4.
    assert smashed_data_epsilon(noise_multiplier=8.0, delta=1e-5, releases=10) == pytest.approx(
        expected, abs=0.02
    )


def test_privacy_config_reports_per_release_and_composed_epsilons():
    config = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=2.0)
    eps = config.epsilons(releases=4, dp_steps=0)
    assert eps["smashed-epsilon-per-release"] == pytest.approx(4.3772, abs=1e-4)
    assert eps["smashed-epsilon"] > eps["smashed-epsilon-per-release"]
    assert "dp-epsilon" not in eps


# -- NoPeek's distance correlation ---------------------------------------------------------------


def test_distance_correlation_is_near_zero_for_independent_data():
    generator = torch.Generator().manual_seed(0)
    values = [
        float(distance_correlation(torch.randn(64, 20, generator=generator), torch.randn(64, 30)))
        for _ in range(5)
    ]
    assert abs(sum(values) / len(values)) < 0.05


def test_distance_correlation_is_near_one_for_dependent_data():
    x = torch.randn(64, 20)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20))
    assert float(distance_correlation(x, 3.0 * x @ rotation + 1.0)) == pytest.approx(1.0, abs=1e-6)
    # Non-linear dependence, which squared distances would miss, still shows.
    u = torch.linspace(-1, 1, 64).unsqueeze(1)
    assert abs(float(torch.corrcoef(torch.cat([u, u**2], 1).T)[0, 1])) < 1e-6
    assert float(distance_correlation(u, u**2)) > 0.15


def test_nopeek_penalty_lowers_distance_correlation_of_smashed_data():
    client, server = conv_halves()
    batches = digits_batches(0, 256, batch_size=32)
    images = torch.cat([b[0] for b in batches])
    before = float(distance_correlation(images, client(images)))
    run_local_epochs(
        split=as_split(client, server),
        data_plane=LocalPlane(server),
        train_loader=batches,
        optimizer=torch.optim.Adam([*client.parameters(), *server.parameters()], lr=0.01),
        local_epochs=3,
        privacy=PrivacyConfig(nopeek_weight=5.0),
    )
    assert float(distance_correlation(images, client(images))) < before - 0.2


# -- label protection (label-private split) ------------------------------------------------------


def test_label_protection_gives_every_example_the_batch_mean_norm():
    gradient = torch.randn(8, 64) * torch.arange(1, 9).view(8, 1)
    mean_norm = gradient.norm(dim=1).mean()
    rescaled = protect_output_gradient(gradient, noise_multiplier=0.0)
    torch.testing.assert_close(rescaled.norm(dim=1), mean_norm.expand(8))
    # Directions are kept before noise: only the lengths change.
    cosine = nn.functional.cosine_similarity(rescaled, gradient, dim=1)
    torch.testing.assert_close(cosine, torch.ones(8))


def test_label_protection_noise_has_the_configured_expected_norm():
    gradient = torch.randn(16, 64) * torch.arange(1, 17).view(16, 1)
    mean_norm = gradient.norm(dim=1).mean()
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            protect_output_gradient(gradient, noise_multiplier=0.5, generator=generator)
            - protect_output_gradient(gradient, noise_multiplier=0.0)
            for _ in range(200)
        ]
    )
    noise_norm = draws.pow(2).sum(-1).mean().sqrt()
    torch.testing.assert_close(noise_norm, 0.5 * mean_norm, rtol=0.03, atol=0)


# -- DP-SGD on the client half -------------------------------------------------------------------


def test_dp_sgd_update_is_the_mean_of_clipped_per_example_gradients():
    client, server = conv_halves()
    reference = copy.deepcopy(client)
    images, labels = digits_batches(0, 8, batch_size=8)[0]
    # Noise as good as none, so the update can be compared exactly.
    privacy = PrivacyConfig(dp_noise_multiplier=1e-12, dp_max_grad_norm=0.05)
    split = as_split(client, server)
    with privacy.training(split, torch.optim.SGD(client.parameters(), lr=1.0), batch_size=8) as (
        private,
        optimizer,
    ):
        assert private.client_half is not client  # Opacus' per-example gradient module
        run_local_epochs(
            split=private,
            data_plane=LocalPlane(server),
            train_loader=[(images, labels)],
            optimizer=optimizer,
        )
    # Leaving the block removed Opacus' hooks.
    assert not any(m._forward_hooks or m._backward_hooks for m in client.modules())

    clipped_sum = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(8):
        reference.zero_grad()
        loss = nn.functional.cross_entropy(server(reference(images[i : i + 1])), labels[i : i + 1])
        loss.backward()
        grads = [p.grad.clone() for p in reference.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, 0.05 / (float(norm) + 1e-6))
        assert factor < 1.0  # the bound is active: clipping is really tested
        for total, g in zip(clipped_sum, grads, strict=True):
            total.add_(g * factor)
    for param, start, total in zip(
        client.parameters(), reference.parameters(), clipped_sum, strict=True
    ):
        torch.testing.assert_close(param.detach(), start.detach() - total / 8, rtol=1e-4, atol=1e-6)


# -- refused settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kwargs", "fix"),
    [
        (PrivacyConfig(smashed_noise_multiplier=0.5), {}, "smashed_clip_norm"),
        (PrivacyConfig(label_noise_multiplier=1.0), {}, "server_cut"),
        (PrivacyConfig(dp_noise_multiplier=1.0), {}, "dp_max_grad_norm"),
        (
            PrivacyConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, grad_sample_mode="ghost"),
            {},
            "ghost",
        ),
        (
            PrivacyConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0),
            {"server_loss_reduction": "sum"},
            "reduction='mean'",
        ),
        (
            PrivacyConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0),
            {"client_half": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))},
            "GroupNorm",
        ),
        (
            PrivacyConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, nopeek_weight=1.0),
            {},
            "nopeek_weight",
        ),
        (
            PrivacyConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0),
            {"label_private": True},
            "client head",
        ),
        (PrivacyConfig(delta=0.0), {}, "delta"),
        (PrivacyConfig(smashed_clip_norm=-1.0), {}, "smashed_clip_norm"),
    ],
)
def test_settings_that_would_protect_nothing_are_refused_with_a_fix(config, kwargs, fix):
    with pytest.raises(PrivacyConfigError, match="refused") as raised:
        config.validate(**kwargs)
    assert fix in str(raised.value)


def test_opacus_wrapper_refuses_ghost_clipping():
    client, _ = conv_halves()
    with pytest.raises(PrivacyConfigError, match="ghost"):
        make_client_half_private(
            client_half=client,
            optimizer=torch.optim.SGD(client.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=8,
            grad_sample_mode="ghost",
        )


def test_legal_but_weak_settings_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr_splitfed"):
        PrivacyConfig(smashed_clip_norm=1.0).validate()
        PrivacyConfig(nopeek_weight=1.0).validate()
    text = caplog.text
    assert "no privacy guarantee" in text and "gives no guarantee" in text
