"""The leakage monitor: its attack against cases whose answer is known, its errors, its threshold,
and a run it stops under `flwr run`."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from splitfed import LeakageMonitor, PrivacyConfig
from splitfed.monitor import roc_auc

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


# -- the label-private split: its labels attacked through the server half ---------------------

CLASSES = 4
OUTPUTS = 8


def labelled_inputs(count: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs whose class is in their first coordinates: class c adds 3 to input c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (count,), generator=generator)
    inputs = torch.randn(count, FEATURES, generator=generator)
    inputs[torch.arange(count), labels] += 3.0
    return inputs, labels


def selector(inputs: int, outputs: int) -> nn.Module:
    """A linear layer that passes its first ``outputs`` inputs on unchanged."""
    layer = nn.Linear(inputs, outputs)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(outputs, inputs))
        layer.bias.zero_()
    return layer


def identity_server_half() -> nn.Module:
    """Passes the first OUTPUTS coordinates on: the class shows in its outputs."""
    return selector(FEATURES, OUTPUTS)


def class_head() -> nn.Module:
    """Reads the class off the server half's outputs: the head a converged client holds."""
    return selector(OUTPUTS, CLASSES)


def label_private_monitor(server_half: nn.Module, **kwargs) -> tuple[LeakageMonitor, nn.Module]:
    inputs, labels = labelled_inputs()
    client_half = nn.Identity()
    monitor = LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels, **kwargs)
    monitor.bind(client_half, activation_shape=(FEATURES,), server_half=server_half)
    return monitor, client_half


def test_roc_auc_is_the_mann_whitney_statistic_with_ties_counted_half():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=generator).double()  # many ties
    positive = torch.rand(300, generator=generator) < scores / 8
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert roc_auc(scores, torch.ones(300, dtype=torch.bool)) == 0.5


def test_the_head_this_process_holds_labels_what_it_classifies_and_the_surrogate_learns_it():
    server_half, head = identity_server_half(), class_head()
    monitor, client_half = label_private_monitor(server_half, steps_per_round=300)
    estimate = monitor.measure(1, client_half, server_half=server_half, client_head=head)
    # By hand: the head on the held-out examples' server-half outputs.
    inputs, labels = monitor._inputs[monitor._held_out], monitor._labels[monitor._held_out]
    expected = (head(server_half(inputs)).argmax(dim=1) == labels).double().mean()
    assert estimate.label_head_forward == pytest.approx(float(expected))
    assert estimate.label_head_forward > 0.85
    assert estimate.label_surrogate > 0.85  # the class is linear in the outputs
    counts = labels.bincount()
    assert estimate.label_chance == pytest.approx(float(counts.max() / counts.sum()))
    # Gradients p - y at well-separated classes: same-label pairs point alike.
    assert estimate.label_cosine_auc > 0.9
    assert estimate.labels_recovered == max(estimate.label_head_forward, estimate.label_surrogate)
    assert {
        "leakage-label-head-forward",
        "leakage-label-surrogate",
        "leakage-label-chance",
        "leakage-label-cosine-auc",
    } <= set(estimate.metrics())
    # The labels stay on the clients: re-identification picks among every held-out example.
    assert estimate.chance == pytest.approx(1 / len(monitor._held_out))


def test_a_server_half_that_forgets_its_input_hides_labels_from_the_surrogate_not_the_gradients():
    server_half = nn.Linear(FEATURES, OUTPUTS)
    nn.init.zeros_(server_half.weight)
    nn.init.zeros_(server_half.bias)
    monitor, client_half = label_private_monitor(server_half, steps_per_round=200)
    estimate = monitor.measure(1, client_half, server_half=server_half, client_head=class_head())
    # Constant outputs: every example gets the same prediction, the most common label at best.
    assert estimate.label_surrogate <= estimate.label_chance + 1e-9
    # ...but the gradient of the loss still carries the label itself.
    assert estimate.label_cosine_auc > 0.99


def test_label_noise_drowns_the_cosine_attack_and_local_heads_leave_head_forward_out():
    server_half = identity_server_half()
    monitor, client_half = label_private_monitor(
        server_half, steps_per_round=100, privacy=PrivacyConfig(label_noise_multiplier=100.0)
    )
    # Heads kept on the clients: no head here; the gradients are taken through the surrogate.
    estimate = monitor.measure(1, client_half, server_half=server_half, client_head=None)
    assert estimate.label_head_forward is None
    assert "leakage-label-head-forward" not in estimate.metrics()
    assert estimate.label_cosine_auc == pytest.approx(0.5, abs=0.08)
    assert estimate.label_surrogate > 0.85


def test_the_label_threshold_warns_and_with_stop_stops(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    server_half = identity_server_half()
    monitor, client_half = label_private_monitor(
        server_half, steps_per_round=100, label_threshold=0.5, action="stop"
    )
    estimate = monitor.measure(1, client_half, server_half=server_half, client_head=class_head())
    assert estimate.exceeded and monitor.stops(estimate)
    assert (
        "recovers held-out labels (0." in caplog.text
        and "above the label threshold 0.500" in caplog.text
    )
    calm, _ = label_private_monitor(server_half, steps_per_round=1, label_threshold=1.0)
    assert not calm.measure(1, client_half, server_half=server_half).exceeded


def test_attacking_labels_leaves_the_server_half_the_head_and_the_random_state_alone():
    server_half = nn.Sequential(
        nn.Linear(FEATURES, OUTPUTS), nn.BatchNorm1d(OUTPUTS), nn.Dropout(0.3)
    )
    head = nn.Sequential(nn.Linear(OUTPUTS, CLASSES), nn.Dropout(0.3))
    modules = {"server half": server_half, "head": head}
    before = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
    monitor, client_half = label_private_monitor(server_half, steps_per_round=5)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    monitor.measure(1, client_half, server_half=server_half, client_head=head)
    assert torch.equal(torch.rand(3), expected)
    for name, module in modules.items():
        assert module.training, name
        assert all(p.grad is None for p in module.parameters()), name
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


def test_labels_of_any_integer_dtype_are_attacked_alike():
    inputs, labels = labelled_inputs()
    server_half = identity_server_half()
    estimates = []
    for dtype in (torch.int64, torch.int32, torch.uint8):
        monitor = LeakageMonitor(
            auxiliary_inputs=inputs, auxiliary_labels=labels.to(dtype), steps_per_round=20
        )
        monitor.bind(nn.Identity(), activation_shape=(FEATURES,), server_half=server_half)
        estimate = monitor.measure(1, nn.Identity(), server_half=server_half, client_head=None)
        estimates.append((estimate.label_surrogate, estimate.label_cosine_auc))
    assert estimates[1:] == estimates[:1] * 2


def test_watching_reseeds_no_accelerator_generator(monkeypatch):
    # torch.manual_seed would reseed every CUDA generator for good (and so change training on
    # an accelerator); the monitor seeds only the CPU generator it forks.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    server_half = identity_server_half()
    monitor, client_half = label_private_monitor(server_half, steps_per_round=2)
    monitor.measure(1, client_half, server_half=server_half, client_head=class_head())
    assert reseeded == []


def test_a_frozen_submodule_keeps_its_mode():
    # BatchNorm frozen (eval) inside models in training mode, as fine-tuning code does.
    client_half = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES))
    server_half = nn.Sequential(selector(FEATURES, OUTPUTS), nn.BatchNorm1d(OUTPUTS))
    head = nn.Sequential(nn.BatchNorm1d(OUTPUTS), selector(OUTPUTS, CLASSES))
    frozen = (client_half[1], server_half[1], head[0])
    for module in frozen:
        module.eval()
    inputs, labels = labelled_inputs()
    monitor = LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels, steps_per_round=2)
    monitor.bind(client_half, activation_shape=(FEATURES,), server_half=server_half)
    monitor.measure(1, client_half, server_half=server_half, client_head=head)
    assert client_half.training and server_half.training and head.training
    assert not any(module.training for module in frozen)


def test_roc_auc_takes_zero_one_labels_and_refuses_nan_scores():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    as_bool = torch.tensor([False, False, True, True])
    assert roc_auc(scores, as_bool.long()) == roc_auc(scores, as_bool) == 0.75
    with pytest.raises(ValueError, match="finite scores"):
        roc_auc(torch.tensor([0.1, float("nan")]), torch.tensor([True, False]))


def test_label_attacks_refuse_what_they_cannot_score():
    inputs, labels = labelled_inputs()
    with pytest.raises(ValueError, match="label_threshold needs auxiliary_labels"):
        LeakageMonitor(auxiliary_inputs=inputs, label_threshold=0.5)
    server_half = identity_server_half()
    monitor, client_half = label_private_monitor(server_half)
    with pytest.raises(ValueError, match="exactly when bind"):
        monitor.measure(1, client_half)
    with pytest.raises(ValueError, match="the client head has 2 outputs"):
        monitor.measure(1, client_half, server_half=server_half, client_head=nn.Linear(OUTPUTS, 2))
    with pytest.raises(ValueError, match="label_threshold applies to the label-private split"):
        LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels, label_threshold=0.5).bind(
            client_half, activation_shape=(FEATURES,)
        )
    plain = LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels)
    plain.bind(client_half, activation_shape=(FEATURES,))
    with pytest.raises(ValueError, match="exactly when bind"):
        plain.measure(1, client_half, server_half=server_half)
    with pytest.raises(ValueError, match="server half cannot run on the client half's"):
        LeakageMonitor(auxiliary_inputs=inputs, auxiliary_labels=labels).bind(
            client_half, activation_shape=(FEATURES,), server_half=nn.Linear(3, 2)
        )


def test_without_labels_the_label_private_split_says_labels_go_unmeasured(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    inputs, _ = labelled_inputs()
    monitor = LeakageMonitor(auxiliary_inputs=inputs, steps_per_round=2)
    server_half = identity_server_half()
    monitor.bind(nn.Identity(), activation_shape=(FEATURES,), server_half=server_half)
    assert "labels' leakage is not estimated" in caplog.text
    estimate = monitor.measure(1, nn.Identity(), server_half=server_half)
    assert estimate.labels_recovered is None
    assert not any(key.startswith("leakage-label") for key in estimate.metrics())


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
    labelled = format_table(
        {
            1: {
                **base,
                "test-accuracy": 0.9,
                "leakage-reidentification": 0.5,
                "leakage-reidentification-chance": 0.01,
                "leakage-label-surrogate": 0.93,
                "leakage-label-head-forward": 0.97,
                "leakage-label-chance": 0.63,
            }
        }
    ).splitlines()
    assert "labels (chance)" in labelled[0] and "0.97 (0.63)" in labelled[2]
    assert "labels" not in watched[0]
    federated = format_table(
        {1: {**base, "federated-eval-accuracy": 0.875, "federated-eval-loss": 0.3}}
    ).splitlines()
    assert "fed acc" in federated[0] and "re-id" not in federated[0]
    assert "0.8750" in federated[2]


def test_the_runs_picture_adds_a_row_for_the_labels_where_they_were_attacked(tmp_path):
    from PIL import Image

    from simulation.app.plots import plot_run

    watched = {
        "leakage-reidentification": 0.5,
        "leakage-reidentification-chance": 0.01,
        "leakage-explained-variance": 0.6,
    }
    labels = {
        "leakage-label-surrogate": 0.9,
        "leakage-label-chance": 0.6,
        "leakage-label-cosine-auc": 0.8,
    }
    base = {"test-accuracy": 0.9, "test-loss": 0.3, "data-plane-bytes": 1e6, "round-seconds": 1}
    heights = {}
    for name, extra in (("watched", watched), ("labels", {**watched, **labels})):
        history = {r: {**base, **extra} for r in (1, 2)}
        path = plot_run(history, path=tmp_path / f"{name}.png", title=name)
        heights[name] = Image.open(path).size[1]
    # Four rows of plots against three.
    assert heights["labels"] == pytest.approx(heights["watched"] * 4 / 3, rel=0.02)
