"""The audit's metrics on inputs whose answers are known, and a smoke run of the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simulation.audit.audit import (
    Defense,
    cosine_attack_auc,
    main,
    norm_attack_auc,
    reconstruction_metrics,
)


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
    assert str(Defense.parse("dp:1:0.5")) == "dp:1:0.5"
    with pytest.raises(Exception, match="use none"):
        Defense.parse("blur:3")


@pytest.mark.slow
def test_audit_command_quick_run_writes_report_and_plots(tmp_path):
    report = main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["floor"] == report["floor"]
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    rows = {(r["cut"], r["defense"]): r for r in written["summary"]}
    assert rows[("pool", "none")]["ssim"] > written["floor"]["ssim"]  # undefended leaks
    assert 0 <= rows[("pool", "label-noise:0")]["cosine_auc"] <= 1
