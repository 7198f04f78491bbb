"""The leakage monitor: its attack against cases whose answer is known, its errors, its threshold,
and a run it stops under `flwr run`."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from splitfed import LeakageMonitor, PrivacyConfig

FEATURES = 16


def gaussian_inputs(count: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, FEATURES, generator=torch.Generator().manual_seed(seed))


def invertible_client_half(seed: int = 1) -> nn.Module:
    """A linear map of full rank: its activations determine the inputs exactly."""
    torch.manual_seed(seed)
    half = nn.Linear(FEATURES, FEATURES)
    with torch.no_grad():
        half.weight.copy_(torch.eye(FEATURES) + 0.1 * torch.randn(FEATURES, FEATURES))
    return half


def bound_monitor(half: nn.Module, **kwargs) -> LeakageMonitor:
    monitor = LeakageMonitor(auxiliary_inputs=gaussian_inputs(), **kwargs)
    monitor.bind(half, activation_shape=(FEATURES,))
    return monitor


def test_an_invertible_client_half_leaks_every_held_out_example():
    half = invertible_client_half()
    monitor = bound_monitor(half, steps_per_round=300)
    first = monitor.measure(1, half)
    second = monitor.measure(2, half)
    # 100 held-out examples without labels: chance is 1/100.
    assert first.chance == pytest.approx(0.01)
    # The decoder goes on training from round to round, as an attacker's would.
    assert second.explained_variance > first.explained_variance
    assert second.explained_variance > 0.9
    assert second.reidentification >= 0.95
    assert [e.server_round for e in monitor.history] == [1, 2]


def test_activations_drowned_in_noise_leak_no_more_than_chance():
    half = invertible_client_half()
    # Clipped to norm 1 and noised with sigma 20: about 80 times the signal per coordinate.
    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=20.0)
    monitor = bound_monitor(half, privacy=privacy, steps_per_round=300)
    estimate = monitor.measure(1, half)
    assert estimate.reidentification <= 5 * estimate.chance
    assert estimate.explained_variance < 0.1


def test_a_client_half_that_forgets_its_input_leaks_nothing():
    # Its activations are constant: no decoder can tell two examples apart.
    half = nn.Linear(FEATURES, FEATURES)
    nn.init.zeros_(half.weight)
    monitor = bound_monitor(half, steps_per_round=50)
    estimate = monitor.measure(1, half)
    assert estimate.reidentification <= 0.05
    assert estimate.explained_variance < 0.05


def test_with_labels_reidentification_picks_among_the_same_class():
    inputs = gaussian_inputs()
    labels = torch.arange(len(inputs)) % 4
    monitor = LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels, seed=3)
    held_out = labels[monitor._held_out]
    expected = sum(1 / int((held_out == label).sum()) for label in held_out) / len(held_out)
    half = invertible_client_half()
    monitor.bind(half, activation_shape=(FEATURES,))
    estimate = monitor.measure(1, half)
    assert estimate.chance == pytest.approx(expected)
    # Four classes among 100 examples: about 1/25, far above the label-blind 1/100.
    assert 0.03 < estimate.chance < 0.06


def test_the_threshold_warns_and_with_stop_stops(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    half = invertible_client_half()
    warns = bound_monitor(half, steps_per_round=200, threshold=0.1)
    estimate = warns.measure(1, half)
    assert estimate.exceeded and not warns.stops(estimate)
    assert "PRIVACY: after round 1 the split server re-identifies" in caplog.text
    stops = bound_monitor(half, steps_per_round=200, threshold=0.1, action="stop")
    assert stops.stops(stops.measure(1, half))
    calm = bound_monitor(half, steps_per_round=1, threshold=1.0, action="stop")
    estimate = calm.measure(1, half)
    assert not estimate.exceeded and not calm.stops(estimate)


def test_watching_leaves_the_process_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    half = invertible_client_half()  # seeds 1 itself; reseed after it
    torch.manual_seed(7)
    monitor = bound_monitor(
        half,
        steps_per_round=3,
        privacy=PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.5),
    )
    monitor.measure(1, half)
    assert torch.equal(torch.rand(3), expected)


def test_measured_rounds_follow_every_and_include_the_last():
    monitor = LeakageMonitor(auxiliary_inputs=gaussian_inputs(), every=3)
    assert [r for r in range(1, 8) if monitor.due(r, 7)] == [3, 6, 7]


def test_measuring_leaves_the_client_half_and_the_random_state_as_they_were():
    half = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES), nn.Dropout(0.5))
    half.eval()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    monitor = bound_monitor(half, steps_per_round=5)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    monitor.measure(1, half)
    # Dropout ran (training mode) without drawing from the process's generator.
    assert torch.equal(torch.rand(3), expected)
    assert not half.training
    for key, value in half.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in half.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auxiliary_inputs": torch.zeros(40, 4, dtype=torch.int64)}, "floating-point tensor"),
        ({"auxiliary_inputs": torch.full((40, 4), float("nan"))}, "NaN"),
        ({"auxiliary_inputs": torch.zeros(8, 4)}, "at least 4 must be held out"),
        (
            {"auxiliary_inputs": torch.zeros(40, 4), "max_examples": 10},
            "raise max_examples",
        ),
        ({"auxiliary_inputs": torch.zeros(40, 4), "holdout_fraction": float("nan")}, "(0, 1)"),
        (
            {
                "auxiliary_inputs": torch.zeros(40, 4),
                "auxiliary_labels": torch.zeros(39, dtype=torch.long),
            },
            "39 entries for 40",
        ),
        (
            {"auxiliary_inputs": torch.zeros(40, 4), "auxiliary_labels": torch.eye(40)[:, :4]},
            "not one-hot",
        ),
        ({"auxiliary_inputs": torch.zeros(40, 4), "threshold": 2.0}, "in [0, 1]"),
        ({"auxiliary_inputs": torch.zeros(40, 4), "action": "abort"}, "'warn' or 'stop'"),
        ({"auxiliary_inputs": torch.zeros(40, 4), "every": 0}, "every must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=_escaped(message)):
        LeakageMonitor(**kwargs)


def test_batch_statistics_come_from_client_sized_batches_without_a_batch_of_one():
    # 257 inputs in batches of about 32: a last batch of one would break BatchNorm.
    half = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES))
    monitor = LeakageMonitor(
        auxiliary_inputs=gaussian_inputs(257), client_batch_size=32, steps_per_round=2
    )
    monitor.bind(half, activation_shape=(FEATURES,))
    seen = []
    half.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    monitor.measure(1, half)
    assert sum(seen) == 257 and min(seen) >= 32 and len(seen) == 257 // 32


def test_binding_leaves_a_training_client_half_and_the_random_state_as_they_were():
    half = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES), nn.Dropout(0.5))
    before = {k: v.clone() for k, v in half.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    LeakageMonitor(auxiliary_inputs=gaussian_inputs()).bind(half, activation_shape=(FEATURES,))
    assert torch.equal(torch.rand(2), expected)
    assert half.training
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())


def test_inputs_beyond_max_examples_are_a_seeded_subset():
    first = LeakageMonitor(auxiliary_inputs=gaussian_inputs(400), max_examples=100, seed=2)
    again = LeakageMonitor(auxiliary_inputs=gaussian_inputs(400), max_examples=100, seed=2)
    assert len(first._inputs) == 100 and torch.equal(first._inputs, again._inputs)
    assert len(first._held_out) == 25


def test_inputs_the_client_half_cannot_take_are_refused_at_bind():
    monitor = LeakageMonitor(auxiliary_inputs=torch.zeros(40, 5))
    with pytest.raises(ValueError, match="cannot run on auxiliary_inputs of shape"):
        monitor.bind(nn.Linear(FEATURES, 8), activation_shape=(8,))
    with pytest.raises(ValueError, match=r"not the split's activations of shape \(8,\)"):
        monitor.bind(nn.Linear(5, 7), activation_shape=(8,))
    with pytest.raises(ValueError, match="turns auxiliary_inputs into a tuple, not a tensor"):
        monitor.bind(_TwoOutputs(), activation_shape=(8,))
    with pytest.raises(RuntimeError, match="bind"):
        monitor.measure(1, nn.Linear(5, 8))


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 8)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(inputs), inputs


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.slow
def test_the_app_stops_a_run_whose_leakage_crosses_the_threshold(launch):
    # Undefended SFLV1 after `pool`: one round is enough for the decoder to re-identify far
    # more than 30% of held-out digits (chance about 1/9 among the same class).
    result = launch(
        run_config={
            "num-server-rounds": 3,
            "leakage-monitor": True,
            "leakage-threshold": 0.3,
            "leakage-action": "stop",
        },
        num_supernodes=2,
    )
    assert result.completed, result.failure_report()
    assert sorted(result.metrics) == [1], result.metrics
    first = result.metrics[1]
    assert first["leakage-reidentification"] > 0.3 > first["leakage-reidentification-chance"]
    assert first["leakage-monitor-seconds"] > 0
    assert first["leakage-exceeded"] == 1
    assert "run stopped after round 1 of 3" in result.log
    assert (result.output_dir / "metrics.png").exists()


def test_the_launchers_table_shows_leakage_and_falls_back_to_federated_accuracy():
    from simulation.launch.flwr_cli import format_table

    base = {"data-plane-bytes": 2e6, "model-sync-bytes": 1e5, "round-seconds": 1.5}
    watched = format_table(
        {
            1: {**base, "test-accuracy": 0.5, "test-loss": 1.0},
            2: {
                **base,
                "test-accuracy": 0.9,
                "test-loss": 0.2,
                "leakage-reidentification": 0.75,
                "leakage-reidentification-chance": 0.11,
            },
        }
    ).splitlines()
    assert "re-id (chance)" in watched[0] and "test acc" in watched[0]
    assert watched[2].split()[-2] == "-"  # round 1 not measured
    assert "0.75 (0.11)" in watched[3]
    federated = format_table(
        {1: {**base, "federated-eval-accuracy": 0.875, "federated-eval-loss": 0.3}}
    ).splitlines()
    assert "fed acc" in federated[0] and "re-id" not in federated[0]
    assert "0.8750" in federated[2]
