"""The cut advisor's costs against figures worked out by hand, on models small enough to count,
and a quick run of ``python -m simulation.advisor``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitfed.advisor import WHOLE_MODEL, cut_costs
from splitfed.graph import CutError, cut_points


def linear_stack() -> nn.Sequential:
    # Linear(6, 5) -> ReLU -> Linear(5, 4) -> ReLU -> Linear(4, 3), in float64.
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    ).double()


SAMPLE = torch.randn(3, 6, dtype=torch.float64)


def by_cut(rows):
    return {row.label: row for row in rows}


def test_every_valid_cut_of_a_sequential_gets_a_row_and_the_whole_model_comes_last():
    rows = cut_costs(linear_stack(), sample_input=SAMPLE)
    # Nothing follows the last layer, so it is no cut.
    assert [row.label for row in rows] == ["0", "1", "2", "3", WHOLE_MODEL]
    assert rows[-1].cut is None


def test_parameters_are_the_weights_and_biases_of_each_side():
    rows = by_cut(cut_costs(linear_stack(), sample_input=SAMPLE))
    assert rows["2"].client_parameters == (6 * 5 + 5) + (5 * 4 + 4)
    assert rows["2"].server_parameters == 4 * 3 + 3
    assert rows["0"].client_parameters == 6 * 5 + 5
    assert rows["2"].client_share == pytest.approx(59 / 74)


def test_flops_count_two_per_multiply_add_forward_and_backward():
    rows = by_cut(cut_costs(linear_stack(), sample_input=SAMPLE))
    # A Linear(i, o) forward is 2*i*o FLOPs per sample; its backward is 2*i*o for the weight
    # gradient plus 2*i*o for the input gradient, which the first layer skips (the data needs
    # none). Bias gradients and ReLUs are not counted.
    assert rows["0"].client_flops == 2 * 6 * 5 + 2 * 6 * 5
    assert rows["2"].client_flops == (2 * 30 + 2 * 20) + (2 * 30 + 2 * 20 + 2 * 20)
    # The server computes the gradient at the cut to send it back.
    assert rows["2"].server_flops == 2 * 12 + 2 * 12 + 2 * 12
    assert rows[WHOLE_MODEL].client_flops == rows["2"].client_flops + rows["2"].server_flops


def test_bytes_per_sample_are_the_cut_activations_up_and_their_gradient_down():
    rows = by_cut(cut_costs(linear_stack(), sample_input=SAMPLE))
    assert rows["2"].activation_shape == (4,) and rows["2"].activation_dtype == torch.float64
    assert rows["2"].bytes_up_per_sample == rows["2"].bytes_down_per_sample == 4 * 8
    assert rows["0"].bytes_per_sample == 2 * 5 * 8
    float32 = by_cut(cut_costs(linear_stack().float(), sample_input=SAMPLE.float()))
    assert float32["0"].bytes_per_sample == 2 * 5 * 4


def test_memory_is_state_gradients_optimizer_state_and_the_batchs_activations():
    rows = by_cut(cut_costs(linear_stack(), sample_input=SAMPLE, batch_size=8, optimizer_states=2))
    row = rows["2"]
    # Parameters, their gradients and two Adam states, in float64.
    assert row.client_memory_bytes - row.client_activation_bytes == 4 * 59 * 8
    # Per sample, autograd keeps the input (6, for the first weight gradient), the ReLU's output
    # (5, also the second Linear's input), and the cut activations (4) wait for their gradient
    # (4): 19 numbers.
    assert row.client_activation_bytes == 8 * 19 * 8
    assert row.client_state_bytes == 59 * 8


def test_the_whole_model_row_holds_the_models_totals_and_sends_nothing_per_batch():
    model = linear_stack()
    whole = cut_costs(model, sample_input=SAMPLE)[-1]
    assert whole.client_parameters == sum(p.numel() for p in model.parameters()) == 74
    assert whole.server_parameters == 0 and whole.server_flops == 0
    assert whole.bytes_per_sample == 0 and whole.activation_shape is None
    assert whole.client_share == 1.0
    assert whole.client_state_bytes == 74 * 8
    assert cut_costs(model, sample_input=SAMPLE, whole_model=False)[-1].cut == "3"


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))) + x)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.block = Block(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(F.relu(self.stem(x))))


def test_a_residual_net_gets_rows_for_its_valid_cuts_only():
    model = ResidualNet()
    sample = torch.randn(4, 6)
    points = cut_points(model, sample_input=sample)
    # Inside the block the skip connection crosses too, so those are no cuts.
    assert {p.name for p in points if not p.valid} >= {"block.fc1", "block.fc2"}
    rows = cut_costs(model, sample_input=sample)
    assert [row.label for row in rows] == [p.name for p in points if p.valid] + [WHOLE_MODEL]
    assert [row.label for row in rows] == ["stem", "block", WHOLE_MODEL]
    total = sum(p.numel() for p in model.parameters())
    for row in rows:
        assert row.client_parameters + row.server_parameters == total
    stem = rows[0]
    assert stem.client_parameters == 6 * 8 + 8
    assert stem.client_flops == 2 * 6 * 8 * 2
    assert stem.bytes_up_per_sample == 8 * 4
    with pytest.raises(CutError, match="cannot cut after 'block.fc1'.*Valid cuts: stem, block"):
        cut_costs(model, sample_input=sample, cuts=["block.fc1"])


def test_an_unknown_cut_is_refused_with_the_valid_cuts():
    with pytest.raises(CutError, match="'conv9' is not a module.*valid cuts are: 0, 1, 2, 3"):
        cut_costs(linear_stack(), sample_input=SAMPLE, cuts=["2", "conv9"])


def test_bad_settings_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="batch_size=0"):
        cut_costs(linear_stack(), sample_input=SAMPLE, batch_size=0)
    with pytest.raises(ValueError, match="2 \\(Adam\\)"):
        cut_costs(linear_stack(), sample_input=SAMPLE, optimizer_states=-1)
    with pytest.raises(ValueError, match="pass at least 2"):
        cut_costs(linear_stack(), sample_input=SAMPLE[:1])


def test_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cut_costs(model, sample_input=torch.randn(2, 1, 5, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_a_sample_sliced_from_a_larger_tensor_counts_its_own_bytes():
    dataset = torch.randn(1000, 6, dtype=torch.float64)
    alone = cut_costs(linear_stack(), sample_input=dataset[10:13].clone())
    sliced = cut_costs(linear_stack(), sample_input=dataset[10:13])
    assert [r.client_memory_bytes for r in sliced] == [r.client_memory_bytes for r in alone]


def test_dropout_in_the_passes_leaves_the_random_state_alone():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    cut_costs(model, sample_input=torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.slow
def test_the_quick_command_writes_the_table_the_json_and_the_plot(tmp_path, capsys):
    from simulation.advisor.advisor import main

    report = main(["--quick", "--out", str(tmp_path)])
    shown = capsys.readouterr().out
    assert "[9/9] whole model" in shown and "elapsed" in shown
    written = json.loads((tmp_path / "advisor.json").read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {row["cut"]: row for row in written["rows"]}
    assert list(rows) == ["conv1", "relu1", "conv2", "relu2", "pool", "flatten", "fc1", "relu3"] + [
        WHOLE_MODEL
    ]
    assert rows["pool"]["bytes_up_per_sample"] == 32 * 4 * 4 * 4
    assert rows[WHOLE_MODEL]["client_parameters"] == 38_282
    for name, row in rows.items():
        assert 0.1 <= row["test_accuracy"] <= 1.0, name
        if name != WHOLE_MODEL:
            assert 0.0 <= row["ssim"] <= 1.0 and 0.0 <= row["reidentification"] <= 1.0
    assert "ssim" not in rows[WHOLE_MODEL]
    assert 0.0 < written["floor"]["reidentification_chance"] < 1.0
    assert (tmp_path / "cut-layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_gives_costs_alone_for_a_model_the_audit_does_not_train(tmp_path, capsys):
    from simulation.advisor.advisor import main

    report = main(["--model", "mlp", "--out", str(tmp_path)])
    assert [row["cut"] for row in report["rows"]] == ["fc1", "fc2", WHOLE_MODEL]
    assert not any("test_accuracy" in row for row in report["rows"])
    assert "costs only" in capsys.readouterr().out
    assert (tmp_path / "cut-layer.png").exists()


def test_the_command_refuses_an_unknown_cut(tmp_path, capsys):
    from simulation.advisor.advisor import main

    with pytest.raises(SystemExit):
        main(["--cuts", "conv9", "--out", str(tmp_path)])
    assert "'conv9' is not a module" in capsys.readouterr().err
