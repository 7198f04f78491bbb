"""The audit's metrics on inputs whose answers are known, its attacks against configurations
whose outcome is known, and a smoke run of the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from simulation.app.task import evaluate_model
from simulation.audit import audit
from simulation.audit.audit import (
    Defense,
    app_accuracy,
    attack,
    averaged_mechanism,
    cluster_attack_accuracy,
    cosine_attack_auc,
    digits_split,
    fit_judge,
    head_forward_accuracy,
    judge_accuracy,
    link_releases,
    linked_average,
    linking_chance,
    load_digits,
    main,
    norm_attack_auc,
    private_and_auxiliary,
    reconstruction_metrics,
    reidentification,
    train_configuration,
    train_decoder,
)
from splitfed import PrivacyConfig


def test_perfect_reconstruction_scores_ssim_one_and_zero_error():
    images = np.random.default_rng(0).random((5, 8, 8))
    scores = reconstruction_metrics(images, images)
    assert scores["mse"] == 0.0 and scores["ssim"] == pytest.approx(1.0)
    assert scores["psnr"] == 100.0  # capped, so the report stays finite


def test_a_worse_reconstruction_scores_worse():
    rng = np.random.default_rng(0)
    images = rng.random((5, 8, 8))
    close = reconstruction_metrics(images, images + rng.normal(0, 0.05, images.shape))
    far = reconstruction_metrics(images, rng.random(images.shape))
    assert close["ssim"] > far["ssim"] and close["psnr"] > far["psnr"]
    assert close["mse"] < far["mse"]


def test_norm_attack_sees_norms_that_differ_by_class_and_not_equal_ones():
    labels = torch.arange(200) % 2
    separable = torch.randn(200, 16)
    separable = separable / separable.norm(dim=1, keepdim=True) * (1 + labels.view(-1, 1))
    assert norm_attack_auc(separable, labels) == pytest.approx(1.0)
    equal = torch.ones(200, 16) * torch.tensor([1.0, -1.0]).repeat(8)
    assert norm_attack_auc(equal, labels) == pytest.approx(0.5)


def test_cosine_attack_sees_class_directions_and_not_random_ones():
    labels = torch.arange(160) % 4
    batch_ids = torch.arange(160) // 16
    directions = torch.randn(4, 32)
    aligned = directions[labels] + 0.1 * torch.randn(160, 32)
    assert cosine_attack_auc(aligned, labels, batch_ids) == pytest.approx(1.0)
    random = torch.randn(160, 32)
    assert cosine_attack_auc(random, labels, batch_ids) == pytest.approx(0.5, abs=0.08)


def test_defense_specs_parse_and_refuse_unknown_names():
    assert Defense.parse("noise:0.1").privacy().smashed_noise_multiplier == 0.1
    assert Defense.parse("label-noise:2").label_private
    local = Defense.parse("local-heads:0.5")
    assert local.label_private and local.client_heads == "local"
    assert local.privacy().label_noise_multiplier == 0.5
    assert Defense.parse("label-noise:0").client_heads == "shared"
    assert str(Defense.parse("dp:1:0.5")) == "dp:1:0.5"
    with pytest.raises(Exception, match="use none"):
        Defense.parse("blur:3")


def test_reidentification_counts_reconstructions_nearest_their_own_original():
    rng = np.random.default_rng(0)
    originals = rng.random((30, 8, 8))
    labels = np.repeat([0, 1, 2], 10)
    rate, chance = reidentification(originals, originals + 0.01, labels)
    assert rate == 1.0 and chance == pytest.approx(3 / 30)
    # Each reconstruction is exactly another example of its class: none is re-identified.
    shifted = np.concatenate([np.roll(originals[labels == c], 1, axis=0) for c in range(3)])
    assert reidentification(originals, shifted, labels)[0] == 0.0


def test_cluster_attack_recovers_labels_of_class_directions_and_not_of_random_ones():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    directions = torch.randn(10, 32, generator=generator)
    aligned = directions[labels] * (1 + torch.rand(400, 1, generator=generator))
    aligned += 0.05 * torch.randn(400, 32, generator=generator)
    assert cluster_attack_accuracy(aligned, labels) == pytest.approx(1.0)
    random = torch.randn(400, 32, generator=generator)
    assert cluster_attack_accuracy(random, labels) < 0.3  # near chance, 0.1


def test_head_forward_accuracy_is_the_share_of_labels_the_head_gives():
    labels = torch.arange(10)
    activations = nn.functional.one_hot(labels, 10).float()
    activations[:3] = nn.functional.one_hot((labels[:3] + 1) % 10, 10).float()  # 3 wrong
    head = nn.Linear(10, 10)
    with torch.no_grad():
        head.weight.copy_(torch.eye(10))
        head.bias.zero_()
    assert head_forward_accuracy(head, nn.Identity(), activations, labels) == pytest.approx(0.7)
    assert head.training  # its mode is restored


def _epochs_of_releases(signal, epochs, noise, rng):
    """``epochs`` releases of every row of ``signal`` with Gaussian noise, each epoch in its own
    order; returns the releases in arrival order and the orders."""
    orders = [rng.permutation(len(signal)) for _ in range(epochs)]
    releases = [signal[o] + rng.normal(0, noise, signal.shape) for o in orders]
    return releases, orders


def test_averaging_releases_linked_by_the_attacker_divides_the_noise_by_their_number():
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 3.0, (60, 64))  # examples far apart: every link is right
    labels = np.arange(60) % 3
    releases, orders = _epochs_of_releases(signal, 8, 0.5, rng)
    means, links = linked_average(releases, [labels[o] for o in orders])
    last = orders[-1]
    for epoch, chain in enumerate(links):
        assert (orders[epoch][chain] == last).all()
    one = ((releases[-1] - signal[last]) ** 2).mean()
    averaged = ((means - signal[last]) ** 2).mean()
    assert one == pytest.approx(0.25, rel=0.1)
    assert averaged == pytest.approx(0.25 / 8, rel=0.15)  # variance over K releases


def test_linking_releases_of_pure_noise_stays_near_chance():
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 10
    queries, candidates = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    chance = linking_chance(labels, labels)
    assert chance == pytest.approx(1 / 40)
    links = link_releases(queries, candidates, labels, labels)
    assert (labels[links] == labels).all()  # only releases of the same label are linked
    assert (links == np.arange(400)).mean() < 3 * chance
    # Copies with a little noise link exactly, one-to-one or greedily.
    copies = queries + rng.normal(0, 0.01, queries.shape)
    permutation = rng.permutation(400)
    for one_to_one in (True, False):
        found = link_releases(
            queries, copies[permutation], labels, labels[permutation], one_to_one=one_to_one
        )
        assert (permutation[found] == np.arange(400)).all()


def test_one_to_one_linking_gives_each_candidate_to_one_query():
    queries = np.array([[0.0], [1.0]])
    candidates = np.array([[0.4], [3.0]])
    assert link_releases(queries, candidates, one_to_one=False).tolist() == [0, 0]
    assert link_releases(queries, candidates).tolist() == [0, 1]
    # A nearer candidate of another label is not linked.
    labelled = link_releases(queries, candidates, np.array([0, 0]), np.array([1, 0]))
    assert labelled.tolist() == [1, 1]


def test_the_mean_of_k_releases_has_the_averaged_mechanisms_noise():
    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.4)
    assert averaged_mechanism(privacy, 16).smashed_noise_multiplier == pytest.approx(0.1)
    assert averaged_mechanism(privacy, 16).smashed_clip_norm == 1.0
    clean = torch.full((1, 4096), 0.01)
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack(
        [privacy.protect_smashed(clean, generator=generator) for _ in range(16)]
    ).mean(0)
    once = averaged_mechanism(privacy, 16).protect_smashed(clean, generator=generator)
    assert float((mean - clean).std()) == pytest.approx(0.1, rel=0.05)
    assert float((once - clean).std()) == pytest.approx(0.1, rel=0.05)


def test_the_audit_records_every_release_and_links_undefended_ones_well():
    trained = train_configuration("pool", Defense.parse("none"), 0, epochs=3)
    releases, orders = trained.recorder.releases, trained.recorder.arrival_orders()
    assert releases is not None and releases.shape[:2] == (3, 718)
    assert not releases.isnan().any()  # every example released once in every epoch
    for order in orders:
        assert sorted(order.tolist()) == list(range(718))
    assert not torch.equal(orders[0], orders[1])
    run, _ = attack(trained, decoder_epochs=2, attack_examples=60, link_epochs=3)
    assert run.linking_chance == pytest.approx(1 / 72, rel=0.2)
    assert run.linking_accuracy > 10 * run.linking_chance
    assert len(run.linking_accuracy_by_epoch) == 2
    for key in ("linked_", "oracle_linked_"):
        for figure in ("ssim", "judge_accuracy", "reidentification"):
            assert 0 <= getattr(run, key + figure) <= 1
    assert run.oracle_linked_reidentification > 0.3  # chance is 10/60
    # One epoch: nothing to link.
    single = attack(
        train_configuration("pool", Defense.parse("noise:0.1"), 0, epochs=1),
        decoder_epochs=1,
        attack_examples=30,
    )[0]
    assert np.isnan(single.linking_accuracy) and np.isnan(single.oracle_linked_ssim)


def test_the_judge_recognises_digits_and_not_the_mean_digit():
    data = load_digits()
    private, aux = private_and_auxiliary(0)
    judge = fit_judge(data.train_images[aux], data.train_labels[aux])
    originals = data.train_images[private][:200, 0].numpy()
    labels = data.train_labels[private][:200].numpy()
    assert judge_accuracy(judge, originals, labels) > 0.9
    mean = np.broadcast_to(originals.mean(axis=0), originals.shape)
    assert judge_accuracy(judge, mean, labels) < 0.2


def test_app_accuracy_is_the_plain_model_on_clean_data():
    torch.manual_seed(0)
    split = digits_split(cut="pool")
    data = load_digits()
    x, y = data.test_images, data.test_labels
    model = split.full_model().eval()
    with torch.no_grad():
        expected = float((model(x).argmax(dim=1) == y).float().mean())
    model.train()
    assert app_accuracy(split, x, y) == pytest.approx(expected)
    assert app_accuracy(split, x, y) == evaluate_model(split.full_model(), x, y)[1]
    assert split.full_model().training  # the app's evaluation restores the mode


def test_audit_reports_the_apps_accuracy_for_a_noise_defense():
    """Noise protects what is sent during training; the app evaluates the merged model on
    clean data, and so does the audit (it used to add noise to the test activations)."""
    trained = train_configuration("pool", Defense.parse("noise:0.5"), 0, epochs=1)
    run, _ = attack(trained, decoder_epochs=1, attack_examples=50)
    data = load_digits()
    model = trained.split.full_model().eval()
    with torch.no_grad():
        clean = float((model(data.test_images).argmax(1) == data.test_labels).float().mean())
        noisy_activations = trained.privacy.protect_smashed(
            trained.split.client_half(data.test_images),
            generator=torch.Generator().manual_seed(0),
        )
        noisy = float(
            (trained.split.server_half(noisy_activations).argmax(1) == data.test_labels)
            .float()
            .mean()
        )
    assert run.test_accuracy == pytest.approx(clean)
    assert abs(run.test_accuracy - noisy) > 0.01  # the two measurements do differ here


def test_a_decoder_trained_on_fresh_draws_of_the_noise_reconstructs_better():
    data = load_digits()
    private, aux = private_and_auxiliary(0)
    aux_images, private_images = data.train_images[aux], data.train_images[private][:300]
    torch.manual_seed(1)
    projection = torch.randn(64, 128) / 8

    def client_half(images):
        return torch.relu(images.flatten(1) @ projection)

    privacy = PrivacyConfig(smashed_clip_norm=1.0, smashed_noise_multiplier=0.2)
    released = privacy.protect_smashed(
        client_half(private_images), generator=torch.Generator().manual_seed(99)
    )
    errors = {}
    for fresh in (True, False):
        decoder = train_decoder(
            client_half(aux_images), aux_images, privacy, epochs=15, seed=0, fresh_draws=fresh
        )
        with torch.no_grad():
            errors[fresh] = float(((decoder(released) - private_images.flatten(1)) ** 2).mean())
    assert errors[True] < 0.95 * errors[False], errors


def test_head_forward_attack_labels_private_digits_with_a_shared_head_not_a_local_one():
    """The aggregator runs in the split server's process: with shared heads it runs the
    client's head on the server half's outputs and reads the labels; with heads kept on the
    client it only has the model's initial head, which labels no better than chance."""
    runs = {}
    for spec in ("label-noise:0", "local-heads:0"):
        trained = train_configuration("pool", Defense.parse(spec), 0, epochs=3)
        runs[spec], _ = attack(trained, decoder_epochs=1, attack_examples=50)
    shared, local = runs["label-noise:0"], runs["local-heads:0"]
    assert shared.head_forward_accuracy > 0.85
    assert shared.head_forward_accuracy >= shared.test_accuracy - 0.05
    assert local.head_forward_accuracy < 0.2  # chance is 0.1
    assert local.test_accuracy > 0.7  # the client still learned with its own head
    # What no split protects against: a head trained on the attacker's labelled digits.
    assert local.surrogate_head_accuracy > 0.8
    assert len(shared.cosine_auc_by_epoch) == 3 and shared.cosine_auc == max(
        shared.cosine_auc_by_epoch
    )


@pytest.mark.slow
def test_audit_command_quick_run_writes_report_and_plots(tmp_path):
    report = main(["--quick", "--heads-clients", "2", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["floor"] == report["floor"]
    for picture in ("reconstructions", "tradeoff", "labels", "heads"):
        assert (tmp_path / f"{picture}.png").stat().st_size > 0
    rows = {(r["cut"], r["defense"]): r for r in written["summary"]}
    floor = written["floor"]
    assert rows[("pool", "none")]["ssim"] > floor["ssim"]  # undefended leaks
    assert rows[("pool", "none")]["reidentification"] > 2 * floor["reidentification_chance"]
    assert floor["class_mean_ssim"] > floor["ssim"]  # knowing the labels is worth something
    assert 0 <= rows[("pool", "label-noise:0")]["cosine_auc"] <= 1
    for row in (rows[("pool", "none")], rows[("pool", "noise:0.1")]):
        linking = [k for k in audit._FIGURES if k.startswith(("linking_acc", "linked_", "oracle_"))]
        assert len(linking) == 7
        for key in linking:
            assert isinstance(row[key], float) and 0 <= row[key] <= 1, key
        assert row["linking_accuracy"] > row["linking_chance"]
    assert (tmp_path / "linking.png").stat().st_size > 0
    assert "linking accuracy" in (tmp_path / "tables.md").read_text()
    assert {(h["partitioner"], h["heads"]) for h in written["heads"]} == {
        ("iid", "shared"),
        ("iid", "local"),
    }
    # The tables are rendered again from the runs alone, with the same figures.
    (tmp_path / "tables.md").unlink()
    again = main(["--tables-only", "--out", str(tmp_path)])
    assert again["summary"] == json.loads(json.dumps(written["summary"]))
    assert "| pool | none |" in (tmp_path / "tables.md").read_text()
