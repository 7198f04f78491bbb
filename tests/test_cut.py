"""Cutting a model in two: where the cut falls, what the halves hold, errors that say how to fix.

``split_model`` cuts an ``nn.Sequential`` by position (an int k puts the first k children on the
client) or by name (the named child is the last one on the client), and ``join_halves`` pairs two
hand-written halves. Both check on a sample batch that the halves connect, in eval mode and
without touching BatchNorm statistics.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from splitfed.cut import CutError, SplitModel, join_halves, split_model
from tests.conftest import small_cnn

CNN_NAMES = ["conv", "norm", "relu", "pool", "flatten", "fc"]


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn_batch(batch: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 1, 8, 8)


class PairOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class Total(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_cut_by_int_puts_first_k_children_on_client(k: int) -> None:
    split = split_model(small_cnn(), cut=k, sample_input=cnn_batch())
    assert list(split.client_half._modules) == CNN_NAMES[:k]
    assert list(split.server_half._modules) == CNN_NAMES[k:]


@pytest.mark.parametrize("name", CNN_NAMES[:-1])
def test_cut_by_name_keeps_named_child_on_client(name: str) -> None:
    split = split_model(small_cnn(), cut=name, sample_input=cnn_batch())
    client_names = list(split.client_half._modules)
    assert client_names[-1] == name
    assert client_names == CNN_NAMES[: CNN_NAMES.index(name) + 1]
    assert list(split.server_half._modules) == CNN_NAMES[CNN_NAMES.index(name) + 1 :]


def test_cut_given_as_a_digit_string_counts_children_like_an_int() -> None:
    by_string = split_model(small_cnn(), cut="2", sample_input=cnn_batch())
    by_int = split_model(small_cnn(), cut=2, sample_input=cnn_batch())
    assert (
        list(by_string.client_half._modules)
        == list(by_int.client_half._modules)
        == ["conv", "norm"]
    )


def test_cut_of_a_default_numbered_sequential_by_int() -> None:
    split = split_model(small_mlp(), cut=3, sample_input=torch.randn(2, 6))
    assert list(split.client_half._modules) == ["0", "1", "2"]
    assert list(split.server_half._modules) == ["3", "4"]
    assert split.activation_shape == (4,)


def test_halves_state_dict_keys_keep_the_original_child_names() -> None:
    model = small_cnn()
    split = split_model(model, cut="pool", sample_input=cnn_batch())
    client_keys, server_keys = (
        split.client_half.state_dict().keys(),
        split.server_half.state_dict().keys(),
    )
    assert set(client_keys) == {
        "conv.weight",
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    assert set(server_keys) == {"fc.weight", "fc.bias"}
    original = model.state_dict()
    for half in (split.client_half, split.server_half):
        for key, value in half.state_dict().items():
            assert torch.equal(value, original[key])


def test_halves_are_copies_that_share_no_storage_with_the_model() -> None:
    model = small_cnn()
    split = split_model(model, cut="pool", sample_input=cnn_batch())
    model_pointers = {p.data_ptr() for p in model.parameters()} | {
        b.data_ptr() for b in model.buffers()
    }
    for half in (split.client_half, split.server_half):
        for tensor in [*half.parameters(), *half.buffers()]:
            assert tensor.data_ptr() not in model_pointers


def test_training_the_halves_does_not_change_the_original_model() -> None:
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    split = split_model(model, cut="pool", sample_input=cnn_batch())
    full = split.full_model()
    full.train()
    optimizer = torch.optim.SGD(full.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        full(cnn_batch()).sum().backward()
        optimizer.step()
    assert not torch.equal(split.client_half.conv.weight, before["conv.weight"])
    assert not torch.equal(split.client_half.norm.running_mean, before["norm.running_mean"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_full_model_of_the_halves_gives_exactly_the_original_output(mode: str) -> None:
    model = small_cnn()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    split = split_model(model, cut="pool", sample_input=cnn_batch())
    full = split.full_model()
    getattr(model, mode)()
    getattr(full, mode)()
    batch = cnn_batch(6)
    with torch.no_grad():
        assert torch.equal(full(batch), model(batch))


def test_full_model_shares_parameters_with_the_halves_and_keeps_the_models_keys() -> None:
    model = small_mlp()
    split = split_model(model, cut=2, sample_input=torch.randn(2, 6))
    full = split.full_model()
    assert list(full.state_dict()) == list(model.state_dict())
    halves = [*split.client_half.parameters(), *split.server_half.parameters()]
    assert [id(p) for p in full.parameters()] == [id(p) for p in halves]
    with torch.no_grad():
        full[2].weight.zero_()
    assert torch.count_nonzero(split.server_half.get_submodule("2").weight) == 0


def test_split_records_activation_shape_without_batch_dim_and_dtype() -> None:
    split = split_model(small_cnn(), cut="pool", sample_input=cnn_batch(5))
    assert isinstance(split, SplitModel)
    assert split.activation_shape == (4, 4, 4)
    assert split.activation_dtype == torch.float32
    flat = split_model(small_cnn(), cut="flatten", sample_input=cnn_batch(5))
    assert flat.activation_shape == (64,)


def test_split_records_the_dtype_of_a_float64_model() -> None:
    split = split_model(
        small_mlp().double(), cut=2, sample_input=torch.randn(3, 6, dtype=torch.float64)
    )
    assert split.activation_dtype == torch.float64
    assert split.activation_shape == (8,)


def test_split_model_is_frozen() -> None:
    split = split_model(small_mlp(), cut=2, sample_input=torch.randn(2, 6))
    with pytest.raises(AttributeError):
        split.activation_shape = (1,)  # type: ignore[misc]


def test_cut_error_is_a_value_error() -> None:
    assert issubclass(CutError, ValueError)


@pytest.mark.parametrize(
    "cut",
    [0, len(CNN_NAMES), len(CNN_NAMES) + 3, -1, "-1", "fc"],
    ids=["zero", "len", "beyond", "negative", "negative-string", "last-child"],
)
def test_cut_outside_the_model_says_the_valid_range_and_lists_children(cut: int | str) -> None:
    with pytest.raises(CutError) as caught:
        split_model(small_cnn(), cut=cut, sample_input=cnn_batch())
    message = str(caught.value)
    assert "outside the model" in message
    assert f"between 1 and {len(CNN_NAMES) - 1}" in message
    for i, name in enumerate(CNN_NAMES):
        assert f"{i}:{name}" in message


def test_cut_by_unknown_name_lists_the_children() -> None:
    with pytest.raises(CutError) as caught:
        split_model(small_cnn(), cut="pool2", sample_input=cnn_batch())
    message = str(caught.value)
    assert "no child named 'pool2'" in message
    assert "[0:conv, 1:norm, 2:relu, 3:pool, 4:flatten, 5:fc]" in message


@pytest.mark.parametrize("cut", [True, False, 1.0, None, ["pool"]], ids=repr)
def test_cut_that_is_not_an_int_or_a_name_is_refused(cut: object) -> None:
    with pytest.raises(
        CutError, match=rf"cut must be an int or a child's name, got {type(cut).__name__}"
    ):
        split_model(small_cnn(), cut=cut, sample_input=cnn_batch())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "model",
    [nn.Linear(6, 3), nn.ModuleList([nn.Linear(6, 3)]), TwoLayers()],
    ids=["Linear", "ModuleList", "custom-module"],
)
def test_a_model_that_is_not_sequential_is_cut_by_names_not_positions(model: object) -> None:
    with pytest.raises(CutError) as caught:
        split_model(model, cut=1, sample_input=torch.randn(2, 6))  # type: ignore[arg-type]
    message = str(caught.value)
    assert type(model).__name__ in message
    assert "module names" in message and "nn.Sequential" in message
    assert "cut_points" in message


def test_a_custom_module_is_cut_by_a_modules_name() -> None:
    model = TwoLayers()
    split = split_model(model, cut="first", sample_input=torch.randn(2, 6))
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(split.server_half(split.client_half(x)), model(x))
    assert set(split.client_state_dict()) == {
        k for k in model.state_dict() if k.startswith("first")
    }


def test_halves_that_do_not_connect_say_the_cut_shape_and_how_to_fix() -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.ReLU(), fc2=nn.Linear(5, 3)))
    with pytest.raises(CutError) as caught:
        split_model(model, cut="act", sample_input=torch.randn(4, 6))
    message = str(caught.value)
    assert "fails on sample_input at the output of fc2" in message
    assert "(4x8 and 5x3)" in message
    assert "batch of the model's inputs" in message


def test_join_halves_with_a_server_half_expecting_the_wrong_size_is_refused() -> None:
    with pytest.raises(CutError, match=r"do not connect.*\(2, 8\)"):
        join_halves(
            client_half=nn.Linear(6, 8), server_half=nn.Linear(7, 3), sample_input=torch.randn(2, 6)
        )


def test_client_half_failing_on_the_sample_input_names_its_shape() -> None:
    with pytest.raises(CutError) as caught:
        split_model(small_cnn(), cut="pool", sample_input=torch.randn(4, 6))
    message = str(caught.value)
    assert "fails on sample_input at the output of conv" in message
    assert "size: [4, 6]" in message and "batch of the model's inputs" in message


def test_client_half_returning_a_tuple_is_refused() -> None:
    with pytest.raises(CutError) as caught:
        join_halves(
            client_half=PairOutput(), server_half=nn.Identity(), sample_input=torch.randn(2, 3)
        )
    message = str(caught.value)
    assert "returns a tuple" in message
    assert "single tensor" in message


def test_cut_after_a_child_returning_a_tuple_of_one_tensor_sends_that_tensor() -> None:
    model = nn.Sequential(OrderedDict(pair=PairOutput(), head=nn.Identity()))
    split = split_model(model, cut="pair", sample_input=torch.randn(2, 3))
    x = torch.randn(4, 3)
    assert split.activation_shape == (3,)
    assert split.server_half(split.client_half(x)) == (x, x)


@pytest.mark.parametrize(
    "sample_input",
    [torch.tensor(1.0), [[0.0] * 6, [0.0] * 6], None],
    ids=["0-d-tensor", "list", "None"],
)
def test_sample_input_without_a_batch_dimension_is_refused(sample_input: object) -> None:
    with pytest.raises(CutError, match="sample_input"):
        split_model(small_mlp(), cut=2, sample_input=sample_input)  # type: ignore[arg-type]


def test_a_single_example_without_batch_dimension_is_caught_by_the_batch_check() -> None:
    with pytest.raises(CutError, match="without the batch of 6 first"):
        split_model(small_mlp(), cut=1, sample_input=torch.randn(6))


def test_client_half_that_drops_the_batch_dimension_is_refused() -> None:
    with pytest.raises(CutError, match=r"maps a batch of 4 to shape \(\)"):
        join_halves(
            client_half=nn.Sequential(nn.Linear(6, 2), Total()),
            server_half=nn.Identity(),
            sample_input=torch.randn(4, 6),
        )


def test_activations_of_a_dtype_the_wire_cannot_carry_are_refused() -> None:
    class ToComplex(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.complex64)

    with pytest.raises(CutError, match=r"complex64.*float32"):
        join_halves(
            client_half=ToComplex(), server_half=nn.Identity(), sample_input=torch.randn(2, 3)
        )


def test_join_halves_pairs_hand_written_halves() -> None:
    client, server = nn.Sequential(nn.Linear(6, 4), Doubler()), nn.Linear(4, 2)
    split = join_halves(client_half=client, server_half=server, sample_input=torch.randn(3, 6))
    assert split.client_half is client and split.server_half is server
    assert split.activation_shape == (4,)
    assert split.activation_dtype == torch.float32


@pytest.mark.parametrize(
    ("client_training", "server_training"),
    [(True, True), (True, False), (False, True), (False, False)],
)
def test_join_halves_restores_train_and_eval_mode(
    client_training: bool, server_training: bool
) -> None:
    client = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    server = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2))
    client.train(client_training)
    server.train(server_training)
    join_halves(client_half=client, server_half=server, sample_input=torch.randn(3, 6))
    assert all(m.training == client_training for m in client.modules())
    assert all(m.training == server_training for m in server.modules())


def test_join_halves_restores_modes_when_the_halves_do_not_connect() -> None:
    client, server = nn.Linear(6, 4), nn.Linear(5, 2)
    client.train()
    server.eval()
    with pytest.raises(CutError):
        join_halves(client_half=client, server_half=server, sample_input=torch.randn(3, 6))
    assert client.training and not server.training


def test_join_halves_runs_the_check_in_eval_mode() -> None:
    seen: list[bool] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    client, server = Spy(), Spy()
    join_halves(client_half=client, server_half=server, sample_input=torch.randn(2, 3))
    assert seen == [False, False]
    assert client.training and server.training


def test_join_halves_does_not_change_batchnorm_statistics() -> None:
    client = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    server = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = copy.deepcopy(
        {
            **{f"c.{k}": v for k, v in client.state_dict().items()},
            **{f"s.{k}": v for k, v in server.state_dict().items()},
        }
    )
    join_halves(client_half=client, server_half=server, sample_input=10 * torch.randn(8, 6) + 3)
    after = {
        **{f"c.{k}": v for k, v in client.state_dict().items()},
        **{f"s.{k}": v for k, v in server.state_dict().items()},
    }
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_split_model_does_not_change_batchnorm_statistics_of_model_or_halves() -> None:
    model = small_cnn().train()
    before = copy.deepcopy(model.state_dict())
    split = split_model(model, cut="pool", sample_input=5 * cnn_batch() + 2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(split.client_half.norm.running_mean, before["norm.running_mean"])
    assert torch.equal(split.client_half.norm.running_var, before["norm.running_var"])
    assert int(split.client_half.norm.num_batches_tracked) == 0
    assert model.training and split.client_half.training and split.server_half.training


def test_join_halves_leaves_no_gradients_behind() -> None:
    client, server = nn.Linear(6, 4), nn.Linear(4, 2)
    join_halves(client_half=client, server_half=server, sample_input=torch.randn(3, 6))
    assert all(p.grad is None for p in [*client.parameters(), *server.parameters()])
