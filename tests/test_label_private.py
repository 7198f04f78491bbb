"""The label-private (U-shaped) split: labels and the loss stay on the client.

With one client, SFLV1 and SFLV2 through the real split server are centralized training of the
unsplit model; the client head travels and is merged with the client half; mismatched sides and
frames that would leak labels are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from simulation.app.models import digits_cnn
from splitfed import (
    CutError,
    GrpcDataPlane,
    OptimizerConfig,
    SFLV1Trainer,
    SplitFed,
    SplitServerError,
    run_local_epochs,
    split_model,
)
from tests.conftest import SGD_MOMENTUM, digits_batches
from tests.test_equivalence import assert_same_state, train_centrally

SAMPLE = torch.zeros(2, 1, 8, 8)


def u_split(seed: int = 0):
    torch.manual_seed(seed)
    return split_model(digits_cnn(), cut="pool", server_cut="relu3", sample_input=SAMPLE)


def test_a_server_cut_cuts_in_three_and_keeps_names():
    split = u_split()
    assert [n for n, _ in split.client_half.named_children()][-1] == "pool"
    assert [n for n, _ in split.server_half.named_children()] == ["flatten", "fc1", "relu3"]
    assert [n for n, _ in split.client_head.named_children()] == ["fc2"]
    assert split.activation_shape == (32, 4, 4)
    assert split.output_shape == (64,)
    x = torch.rand(5, 1, 8, 8)
    full = split.full_model()
    assert full(x).shape == (5, 10)


@pytest.mark.parametrize(
    ("cut", "server_cut"), [("relu3", "pool"), ("pool", "pool"), ("pool", "fc2"), ("pool", 99)]
)
def test_cuts_out_of_order_or_outside_are_refused(cut, server_cut):
    with pytest.raises(CutError, match="server_cut|outside"):
        split_model(digits_cnn(), cut=cut, server_cut=server_cut, sample_input=SAMPLE)


def test_client_state_holds_half_and_head_under_the_models_own_keys():
    split = u_split()
    state = split.client_state_dict()
    assert set(state) == set(split.client_half.state_dict()) | set(split.client_head.state_dict())
    assert set(state) == {k for k in digits_cnn().state_dict() if not k.startswith("fc1.")}
    other = u_split(seed=1)
    other.load_client_state_dict(state)
    assert_same_state(other.client_half, split.client_half)
    assert_same_state(other.client_head, split.client_head)
    assert split.client_parameters() == [
        *split.client_half.parameters(),
        *split.client_head.parameters(),
    ]


def train_unsplit_u(split, batches, *, client_optimizer, server_optimizer, epochs):
    client_params = [*split.client_half.parameters(), *split.client_head.parameters()]
    train_centrally(
        split.full_model(),
        [
            client_optimizer.build(client_params),
            server_optimizer.build(split.server_half.parameters()),
        ],
        batches,
        epochs=epochs,
    )


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_one_client_label_private_equals_centralized_training(variant, split_server_factory):
    split = u_split()
    reference = copy.deepcopy(split)
    initial_head = split.client_head.fc2.weight.detach().clone()
    server_optimizer = OptimizerConfig(torch.optim.Adam, lr=0.01)
    server = split_server_factory(copy.deepcopy(split), variant=variant, optimizer=server_optimizer)
    batches = digits_batches(0, 100, batch_size=16)  # the last batch has 4 examples
    tokens = server.open_round(1, [7])
    optimizer = SGD_MOMENTUM.build(split.client_parameters())
    with GrpcDataPlane(address=server.address, node_id=7, server_round=1, token=tokens[7]) as plane:
        stats = run_local_epochs(
            split=split,
            data_plane=plane,
            train_loader=batches,
            optimizer=optimizer,
            local_epochs=3,
        )
    assert stats.steps == 3 * len(batches) and stats.num_examples == 300
    assert server.close_round().examples_by_node == {7: 300}

    train_unsplit_u(
        reference,
        batches,
        client_optimizer=SGD_MOMENTUM,
        server_optimizer=server_optimizer,
        epochs=3,
    )
    trainer = server.trainer
    server_half = trainer.copy_for(7) if isinstance(trainer, SFLV1Trainer) else trainer.server_half
    assert_same_state(split.client_half, reference.client_half)
    assert_same_state(server_half, reference.server_half)
    assert_same_state(split.client_head, reference.client_head)
    assert not torch.allclose(split.client_head.fc2.weight, initial_head)


def test_plain_client_is_refused_by_a_label_private_server(split_server_factory):
    split = u_split()
    server = split_server_factory(copy.deepcopy(split), variant="v1")
    tokens = server.open_round(1, [3])
    with (
        GrpcDataPlane(address=server.address, node_id=3, server_round=1, token=tokens[3]) as plane,
        pytest.raises(SplitServerError, match="label-private"),
    ):
        plane.exchange(1, torch.zeros(4, 32, 4, 4), torch.zeros(4, dtype=torch.long))


def test_labels_in_a_smashed_frame_are_refused_and_the_next_batch_still_trains(
    split_server_factory,
):
    from splitfed.wire import Frame, FrameKind

    split = u_split()
    server = split_server_factory(copy.deepcopy(split), variant="v2")
    tokens = server.open_round(1, [3])
    with GrpcDataPlane(address=server.address, node_id=3, server_round=1, token=tokens[3]) as plane:
        leaky = Frame(
            FrameKind.SMASHED,
            1,
            tensors={"activations": torch.zeros(4, 32, 4, 4), "labels": torch.zeros(4)},
        )
        with pytest.raises(SplitServerError, match="labels"):
            plane._round_trip(leaky, expect=FrameKind.SERVER_OUTPUT, tensor="outputs")
        outputs = plane.forward_server_half(1, torch.rand(4, 32, 4, 4))
        with pytest.raises(SplitServerError, match="shape"):
            plane.backward_server_half(1, torch.zeros(4, 3))
        # The refused gradient dropped the pending batch (and released SFLV2's server half).
        outputs = plane.forward_server_half(1, torch.rand(4, 32, 4, 4))
        cut = plane.backward_server_half(1, torch.ones_like(outputs))
    assert cut.shape == (4, 32, 4, 4)
    assert server.trainer.steps_by_node == {3: 1}


def test_strategy_merges_the_client_head_with_the_client_half():
    split = u_split()
    strategy = SplitFed(split=split, insecure=True)
    assert strategy.label_private and strategy.split_server.label_private
    assert set(strategy.client_half_keys) == set(split.client_state_dict())
    with pytest.raises(ValueError, match="client_state_dict"):
        strategy._check_client_half(ArrayRecord(split.client_half.state_dict()))
    with pytest.raises(ValueError, match="client head"):
        SplitFed(split=split, insecure=True, loss_fn=nn.CrossEntropyLoss())
