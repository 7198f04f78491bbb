"""Cutting any traceable model after a named module (splitfed.graph), checked to be exact."""

from __future__ import annotations

import copy
import gc
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitfed.cut import CutError
from splitfed.graph import GraphPiece, cut_graph, cut_points, materialize

# -- models -------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """A small ResNet for 3x32x32 images, with functional calls in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ModeDropout(nn.Module):
    """Dropout written with ``self.training``, which tracing bakes in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=self.training)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.drop = ModeDropout()
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        x = F.dropout(F.relu(self.fc2(x)), 0.3, training=self.training)
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.fc3(x)


class SkipNet(nn.Module):
    """A residual branch from ``stem`` to the sum, spanning the modules ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.post = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.b(F.relu(self.a(x))) + x
        return self.head(F.relu(self.post(y)))


class InputReuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(F.relu(self.enc(x))) + x


class MaskedNet(nn.Module):
    """An optional attention-style mask, applied after the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        with torch.no_grad():
            scale = h.abs().mean()
        return self.fc2(h / scale)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if x.sum() > 0:
            x = -x
        return self.fc2(x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class Stacked(nn.Module):
    """Blocks in an nn.ModuleList (iterated, never called) and a module forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        return self.head(x)


class WideTop(nn.Module):
    """A small lower part and an upper part of ``depth`` layers of ``width`` features."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.lower = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.widen = nn.Linear(32, width)
        self.upper = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upper(F.relu(self.widen(self.lower(x)))))


class Frequencies(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("freq", torch.arange(4.0), persistent=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) * self.freq)


# -- helpers ------------------------------------------------------------------------------------


def run_joined(pieces: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    out = pieces[0](x)
    for piece in pieces[1:]:
        out = piece(out)
    return out


def run_split(pieces: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Forward and backward as SplitFed runs them: each cut is a detached tensor, and the
    gradient at it is handed back by hand."""
    sent = [pieces[0](x)]
    received = []
    for piece in pieces[1:]:
        activations = sent[-1].detach().requires_grad_()
        received.append(activations)
        sent.append(piece(activations))
    sent[-1].square().mean().backward()
    for out, inp in zip(reversed(sent[:-1]), reversed(received), strict=True):
        out.backward(inp.grad)
    return sent[-1]


def assert_same_state(reference: nn.Module, model: nn.Module) -> None:
    """Buffers and gradients of ``model`` equal those of ``reference``, bit for bit."""
    for (name, a), b in zip(reference.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b), f"buffer {name} differs"
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, f"{name} has no gradient"
        assert torch.equal(a.grad, b.grad), f"gradient of {name} differs"


def check_exact(
    model: nn.Module,
    cuts: list[str],
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: Sequence[int] = (2, 3, 5),
) -> list[GraphPiece]:
    """Pieces of ``model`` match a copy of it in train and eval mode: outputs, BatchNorm
    statistics, gradients, under the same seed, for several batch sizes."""
    reference = copy.deepcopy(model)
    pieces = cut_graph(model, cuts=cuts, sample_input=make_input(2))
    for mode in (True, False, True):
        reference.train(mode)
        for piece in pieces:
            piece.train(mode)
        for batch in batch_sizes:
            x = make_input(batch)
            reference.zero_grad()
            model.zero_grad()
            torch.manual_seed(batch)
            expected = reference(x)
            expected.square().mean().backward()
            torch.manual_seed(batch)
            assert torch.equal(run_split(pieces, x), expected), (mode, batch)
            assert_same_state(reference, model)
            with torch.no_grad():
                torch.manual_seed(batch)
                joined = run_joined(pieces, x)
                torch.manual_seed(batch)
                assert torch.equal(joined, reference(x)), (mode, batch)
            for a, b in zip(reference.buffers(), model.buffers(), strict=True):
                assert torch.equal(a, b)
    return pieces


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def features(width: int) -> Callable[[int], torch.Tensor]:
    def make(batch: int) -> torch.Tensor:
        return torch.randn(batch, width, generator=torch.Generator().manual_seed(batch))

    return make


def error_of(model: nn.Module, cuts: list[str], sample_input: Any) -> str:
    with pytest.raises(CutError) as info:
        cut_graph(model, cuts=cuts, sample_input=sample_input)
    return str(info.value)


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cuts",
    [["layer1"], ["layer1.0"], ["bn1"], ["layer1", "layer2"], ["layer1.1", "avgpool"]],
    ids=lambda cuts: "+".join(cuts),
)
def test_resnet_pieces_are_exact(cuts: list[str]) -> None:
    torch.manual_seed(0)
    check_exact(ResNet(), cuts, images)


def test_resnet_pieces_share_the_model_state_under_its_names() -> None:
    torch.manual_seed(0)
    model = ResNet()
    pieces = cut_graph(model, cuts=["layer1", "layer2"], sample_input=images(2))
    keys = [set(piece.state_dict()) for piece in pieces]
    assert set().union(*keys) == set(model.state_dict())
    assert sum(map(len, keys)) == len(model.state_dict()), "pieces overlap"
    assert "layer1.0.conv1.weight" in keys[0] and "bn1.running_mean" in keys[0]
    assert "layer2.1.bn2.num_batches_tracked" in keys[1] and keys[2] == {"fc.weight", "fc.bias"}
    params = dict(model.named_parameters())
    for piece in pieces:
        for name, param in piece.named_parameters():
            assert param is params[name], f"{name} is a copy"
    buffers = dict(model.named_buffers())
    for piece in pieces:
        for name, buf in piece.named_buffers():
            assert buf is buffers[name], f"{name} is a copy"
    # What crossed, recorded from the sample.
    assert pieces[0].output_crossing is not None and pieces[1].input_crossing is not None
    assert pieces[0].output_crossing.shape == (8, 32, 32)
    assert pieces[1].output_crossing is not None
    assert pieces[1].output_crossing.shape == (16, 16, 16)
    assert pieces[1].output_crossing.dtype == torch.float32
    assert pieces[0].input_crossing is None and pieces[2].output_crossing is None


def test_mlp_pieces_are_exact_and_survive_copy_and_pickle() -> None:
    torch.manual_seed(0)
    model = MLP()
    pieces = check_exact(model, ["fc1", "fc2"], features(12))
    assert [set(piece.state_dict()) for piece in pieces] == [
        {"fc1.weight", "fc1.bias"},
        {"fc2.weight", "fc2.bias"},
        {"fc3.weight", "fc3.bias"},
    ]
    x = features(12)(4)
    expected = run_joined(pieces, x)
    copies = [copy.deepcopy(piece) for piece in pieces]
    assert torch.equal(run_joined(copies, x), expected)
    assert copies[0].get_parameter("fc1.weight") is not model.fc1.weight
    restored = [pickle.loads(pickle.dumps(piece)) for piece in pieces]
    assert torch.equal(run_joined(restored, x), expected)


def test_mode_dependent_forward_is_exact_in_train_and_eval() -> None:
    torch.manual_seed(0)
    model = DropoutNet()
    pieces = check_exact(model, ["fc1", "fc2"], features(12))
    # Tracing baked self.training into each graph, so each piece holds one per mode.
    assert "training = True" in pieces[1].code and "training = False" in pieces[1].code
    x = features(12)(6)
    for piece in pieces:
        piece.train()
    torch.manual_seed(1)
    train_out = run_joined(pieces, x)
    for piece in pieces:
        piece.eval()
    assert not torch.equal(train_out, run_joined(pieces, x)), "eval mode must skip dropout"
    model.eval()
    assert torch.equal(run_joined(pieces, x), model(x))
    # A traced submodule left in another mode than its piece would run the wrong graph.
    pieces[1].train()
    pieces[1].get_submodule("drop").eval()
    with pytest.raises(RuntimeError, match="drop"):
        pieces[1](pieces[0](x))


def test_sequential_cut_by_name_matches_slicing_its_children() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            norm=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            drop=nn.Dropout(0.2),
            fc=nn.Linear(4 * 16 * 16, 10),
        )
    )
    sliced = copy.deepcopy(model)
    halves = [sliced[:4], sliced[4:]]
    pieces = cut_graph(model, cuts=["pool"], sample_input=images(2))
    assert [set(p.state_dict()) for p in pieces] == [set(h.state_dict()) for h in halves]
    for mode in (True, False):
        model.train(mode)
        sliced.train(mode)
        for batch in (2, 3):
            x = images(batch)
            torch.manual_seed(batch)
            expected = run_split(halves, x)
            torch.manual_seed(batch)
            assert torch.equal(run_split(pieces, x), expected)
            assert_same_state(sliced, model)
            model.zero_grad()
            sliced.zero_grad()
    check_exact(model, ["pool"], images)


def test_transformer_encoder_is_cut_around_it_but_not_inside() -> None:
    torch.manual_seed(0)
    model = Encoder()

    def tokens(batch: int) -> torch.Tensor:
        return torch.randn(batch, 5, 6, generator=torch.Generator().manual_seed(batch))

    # torch.fx keeps nn.TransformerEncoder whole: it runs as the module itself, exactly.
    check_exact(model, ["embed"], tokens)
    pieces = check_exact(model, ["encoder"], tokens)
    assert pieces[0].output_crossing is not None
    assert pieces[0].output_crossing.shape == (5, 16)
    # Inside it, its forward branches on its input, which a graph cannot capture.
    message = error_of(model, ["encoder.layers.0"], tokens(2))
    assert "torch.fx cannot trace" in message and "torch/nn/modules/transformer.py" in message
    assert "join_halves" in message


# -- refusals -----------------------------------------------------------------------------------


def test_skip_connection_across_the_cut_is_refused_with_every_crossing_tensor() -> None:
    model = SkipNet()
    message = error_of(model, ["a"], torch.randn(2, 8))
    assert "2 values cross" in message
    assert "the output of a" in message
    assert "relu" in message and "x = F.relu(self.stem(x))" in message
    assert "before it stem (16)" in message and "after it post (16)" in message
    # Both cuts outside the residual branch are fine, also for the three-piece split.
    check_exact(model, ["stem", "post"], features(8))

    message = error_of(InputReuse(), ["enc"], torch.randn(2, 8))
    assert "the output of enc" in message and "the model's input `x`" in message


def test_keyword_inputs_work_and_a_mask_used_after_the_cut_is_refused() -> None:
    model = MaskedNet()
    x = torch.randn(3, 8)
    # Without a mask, the graph is traced with mask=None: one tensor crosses.
    pieces = cut_graph(model, cuts=["fc1"], sample_input={"x": x})
    assert torch.equal(pieces[1](pieces[0](x=x)), model(x))
    assert torch.equal(pieces[1](pieces[0](x)), model(x))
    message = error_of(model, ["fc1"], {"x": x, "mask": torch.ones(3, 8)})
    assert "the model's input `mask`" in message and "the output of fc1" in message


def test_forward_that_switches_off_gradients_is_refused() -> None:
    message = error_of(NoGradInside(), ["fc1"], torch.randn(2, 8))
    assert "scale = h.abs().mean()" in message and "torch.no_grad" in message


def test_hooks_of_traced_modules_are_refused() -> None:
    model = ResNet()
    model.layer1.register_forward_hook(lambda module, args, output: output * 2)
    assert "the module `layer1` has forward or backward hooks" in error_of(
        model, ["layer1"], images(2)
    )


def test_data_dependent_control_flow_is_refused_naming_the_line() -> None:
    message = error_of(Branchy(), ["fc1"], torch.randn(2, 8))
    assert "if x.sum() > 0:" in message
    assert "join_halves(client_half=..., server_half=..., sample_input=...)" in message


def test_tied_weights_across_the_cut_are_refused() -> None:
    message = error_of(TiedLM(), ["mix"], torch.randint(0, 10, (2, 5)))
    assert "embed.weight and head.weight are the same tensor" in message


def test_bad_names_and_orders_are_refused_with_the_valid_cut_points() -> None:
    model = ResNet()
    x = images(2)
    message = error_of(model, ["layr1"], x)
    assert "no module named 'layr1'" in message and "Did you mean `layer1`" in message
    assert "layer1 (8x32x32)" in message and "avgpool (16x1x1)" in message
    assert "forward order" in error_of(model, ["layer2", "layer1"], x)
    assert "same point" in error_of(model, ["layer1.1", "layer1"], x)
    assert "nothing is computed after it" in error_of(model, ["fc"], x)

    stacked = Stacked()
    message = error_of(stacked, ["blocks"], torch.randn(2, 8))
    assert "never calls it" in message and "cut after blocks.2" in message
    assert "never calls it" in error_of(stacked, ["unused"], torch.randn(2, 8))


def test_cut_points_lists_every_called_module_in_forward_order() -> None:
    points = cut_points(ResNet(), sample_input=images(2))
    names = [point.name for point in points]
    assert names.index("bn1") < names.index("layer1.0.conv1") < names.index("layer1")
    by_name = {point.name: point for point in points}
    assert by_name["layer1"].valid and by_name["layer1"].shape == (8, 32, 32)
    assert by_name["layer1"].dtype == torch.float32
    inside = by_name["layer1.0.bn2"]
    assert not inside.valid and len(inside.crossing) == 2 and inside.shape is None
    assert not by_name["fc"].valid
    # A mode-dependent forward: each point is checked in both modes.
    points = cut_points(DropoutNet(), sample_input=torch.randn(2, 12))
    assert [point.name for point in points if point.valid] == ["fc1", "drop", "fc2"]


# -- meta device --------------------------------------------------------------------------------


def test_a_client_materialises_only_its_own_piece_of_a_meta_model() -> None:
    def cut_on_meta(width: int, depth: int) -> list[GraphPiece]:
        with torch.device("meta"):
            model = WideTop(width, depth)
        pieces = cut_graph(model, cuts=["lower"], sample_input=torch.randn(4, 16))
        materialize(pieces[0])
        return pieces

    cut_on_meta(8, 1)  # first use of tracing and meta kernels allocates what later cuts reuse
    gc.collect()
    before = rss_bytes()
    pieces = cut_on_meta(4096, 16)  # the upper part: 16 * 4096 * 4096 * 4 bytes = 1 GiB
    grown = rss_bytes() - before
    server_bytes = sum(p.numel() * p.element_size() for p in pieces[1].parameters())
    assert server_bytes >= 2**30
    assert all(p.is_meta for p in pieces[1].parameters())
    assert not any(t.is_meta for t in tensors_of(pieces[0]))
    assert grown < 32 * 2**20, f"memory grew by {grown / 2**20:.0f} MiB"
    assert pieces[0].output_crossing is not None and pieces[0].output_crossing.shape == (32,)
    client = pieces[0]

    # Loading weights gives the same client half as a real model's.
    torch.manual_seed(0)
    real = WideTop(8, 1)
    real_pieces = cut_graph(real, cuts=["lower"], sample_input=torch.randn(4, 16))
    client.load_state_dict(real_pieces[0].state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(client(x), real_pieces[0](x))


def test_materialise_refuses_a_non_persistent_buffer_it_cannot_restore() -> None:
    with torch.device("meta"):
        model = Frequencies()
    pieces = cut_graph(model, cuts=["fc"], sample_input=torch.randn(2, 4))
    materialize(pieces[0])
    with pytest.raises(CutError, match="freq"):
        materialize(pieces[1])
