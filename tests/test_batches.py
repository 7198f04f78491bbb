"""Batches as Flower users have them: tuples, lists and dicts, checked on the first batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitfed import BatchSpec, join_halves, run_local_epochs, split_model
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split
from tests.test_equivalence import assert_same_state
from tests.test_privacy import LocalPlane


def train(split, loader, **kwargs):
    """Train ``split``'s client half through an in-process server half; what it received."""
    plane = LocalPlane(copy.deepcopy(split.server_half))
    stats = run_local_epochs(
        split=split,
        data_plane=plane,
        train_loader=loader,
        optimizer=SGD_MOMENTUM.build(split.client_parameters()),
        **kwargs,
    )
    return stats, plane


BATCHES = digits_batches(0, 48, batch_size=16)


@pytest.mark.parametrize(
    ("loader", "batch"),
    [
        ([list(b) for b in BATCHES], None),
        ([{"img": x, "label": y} for x, y in BATCHES], None),
        (
            [{"pixels": x, "y": y, "id": torch.arange(len(y))} for x, y in BATCHES],
            BatchSpec(inputs="pixels", labels="y"),
        ),
        ([(y, x) for x, y in BATCHES], BatchSpec(inputs=1, labels=0)),
        ([{"sample": (x, y)} for x, y in BATCHES], lambda b: b["sample"]),
    ],
    ids=["list", "dict-default-keys", "dict-named-keys", "tuple-positions", "function"],
)
def test_every_batch_shape_trains_exactly_like_tuples(loader, batch):
    reference, _ = train(small_split(), BATCHES)
    split = small_split()
    stats, _ = train(split, loader, batch=batch)
    assert (stats.steps, stats.num_examples) == (reference.steps, reference.num_examples) == (3, 48)
    expected = small_split()
    train(expected, BATCHES)
    assert_same_state(split.client_half, expected.client_half)


@pytest.mark.parametrize(
    ("loader", "batch", "complaint"),
    [
        ([{"a": x, "b": y} for x, y in BATCHES], None, "which one holds the labels"),
        ([{"img": x, "mask": x, "label": y} for x, y in BATCHES], None, "more than one key"),
        (
            [{"img": x, "label": y} for x, y in BATCHES],
            BatchSpec(labels="y"),
            "no labels under 'y'",
        ),
        ([(["not", "tensors"], y) for _, y in BATCHES], None, "with_format('torch')"),
        ([(x, y[:3]) for x, y in BATCHES], None, "16 inputs and 3 labels"),
        ([x for x, _ in BATCHES], None, "expected an (inputs, labels) tuple"),
    ],
    ids=["no-label-key", "two-inputs", "missing-key", "not-tensors", "count-mismatch", "bare"],
)
def test_a_batch_that_does_not_fit_is_refused_on_the_first_batch_with_the_fix(
    loader, batch, complaint
):
    split = small_split()
    before = copy.deepcopy(split.client_half.state_dict())
    with pytest.raises(
        TypeError, match=complaint.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        train(split, loader, batch=batch)
    assert "BatchSpec" in str(caught.value) or "tensors" in str(caught.value)
    # Refused before anything was sent or trained.
    assert all(torch.equal(v, split.client_half.state_dict()[k]) for k, v in before.items())


class MaskedMLP(nn.Module):
    """A model whose forward takes keyword inputs, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(features * mask)))


def test_several_input_keys_reach_the_model_as_keyword_arguments():
    sample = {"features": torch.zeros(2, 6), "mask": torch.ones(2, 6)}
    split = split_model(MaskedMLP(), cut="embed", sample_input=sample)
    generator = torch.Generator().manual_seed(0)
    loader = [
        {
            "features": torch.randn(8, 6, generator=generator),
            "mask": (torch.rand(8, 6, generator=generator) > 0.2).float(),
            "label": torch.randint(0, 3, (8,), generator=generator),
        }
        for _ in range(3)
    ]
    stats, plane = train(
        split, loader, batch=BatchSpec(inputs=("features", "mask"), labels="label")
    )
    assert stats.num_examples == 24 and len(plane.received) == 3
    with torch.no_grad():
        first = loader[0]
        expected = split.client_half(features=first["features"], mask=first["mask"])
    assert plane.received[0].shape == expected.shape == (8, 8)


def test_join_halves_takes_a_dict_sample_too():
    class Client(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    split = join_halves(
        client_half=Client(),
        server_half=nn.Linear(4, 2),
        sample_input={"features": torch.zeros(3, 6)},
    )
    assert split.activation_shape == (4,)
