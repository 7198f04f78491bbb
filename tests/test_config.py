"""Configs: the optimizer of each half, the SplitFed variant, and the app's run config.

``OptimizerConfig`` builds any torch optimizer and checks its arguments at once; the app reads
``client-*``/``server-*`` run-config keys into it;
``Variant.validate`` normalises variant names; optimizer state survives a save/load round trip;
``AppConfig`` reads ``[tool.flwr.app.config]``, whose values must be exactly ``AppConfig()``'s
defaults, and refuses unknown keys, wrong types and invalid values.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

from simulation.app.config import OPTIMIZERS, AppConfig, optimizer_config
from splitfed.config import OptimizerConfig, Variant, load_optimizer_state, save_optimizer_state

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config_table() -> dict:
    with PYPROJECT.open("rb") as file:
        return tomllib.load(file)["tool"]["flwr"]["app"]["config"]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1
) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn(5, 4, generator=generator)
        model(inputs).pow(2).sum().backward()
        optimizer.step()


class Unlisted:
    """A class that an optimizer state file has no business naming."""


# OptimizerConfig


def test_optimizer_config_defaults_to_sgd_with_lr_0_05() -> None:
    config = OptimizerConfig()
    assert config.optimizer is torch.optim.SGD and config.kwargs == {"lr": 0.05}
    assert config.name == "SGD"


@pytest.mark.parametrize(
    "optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop]
)
def test_any_torch_optimizer_is_built_with_its_keyword_arguments(optimizer) -> None:
    model = tiny_model()
    built = OptimizerConfig(optimizer, lr=0.003, weight_decay=0.01).build(model.parameters())
    assert type(built) is optimizer
    (group,) = built.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.003, 0.01)


def test_a_factory_builds_the_optimizer_too() -> None:
    def sgd_with_nesterov(params, *, lr: float):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)

    built = OptimizerConfig(sgd_with_nesterov, lr=0.1).build(tiny_model().parameters())
    assert built.param_groups[0]["nesterov"] is True
    assert built.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"lr": -0.1}, "Invalid learning rate"),
        ({"lr": 0.1, "momentum": -0.5}, "Invalid momentum"),
        ({"lr": 0.1, "betas": (0.9, 0.99)}, "betas"),
    ],
)
def test_arguments_the_optimizer_refuses_are_reported_at_once(kwargs, complaint) -> None:
    with pytest.raises(ValueError, match=rf"OptimizerConfig\(SGD.*cannot be built: .*{complaint}"):
        OptimizerConfig(torch.optim.SGD, **kwargs)


def test_something_that_is_not_an_optimizer_is_refused_with_an_example() -> None:
    with pytest.raises(TypeError, match=r"OptimizerConfig\(torch.optim.SGD, lr=0.05\)"):
        OptimizerConfig("sgd")  # type: ignore[arg-type]


def test_optimizer_configs_compare_and_print_by_class_and_arguments() -> None:
    config = OptimizerConfig(torch.optim.AdamW, lr=0.001, weight_decay=0.01)
    assert config == OptimizerConfig(torch.optim.AdamW, weight_decay=0.01, lr=0.001)
    assert config != OptimizerConfig(torch.optim.Adam, lr=0.001, weight_decay=0.01)
    assert repr(config) == "OptimizerConfig(AdamW, lr=0.001, weight_decay=0.01)"


# The app's optimizer keys


def test_run_config_names_sgd_adam_and_adamw() -> None:
    run_config = {
        "client-optimizer": "adam",
        "client-lr": 0.01,
        "client-weight-decay": 0.001,
        "server-optimizer": "ADAMW",
        "server-lr": 0.2,
    }
    client = optimizer_config(run_config, prefix="client-")
    server = optimizer_config(run_config, prefix="server-")
    assert client == OptimizerConfig(torch.optim.Adam, lr=0.01, weight_decay=0.001)
    assert server == OptimizerConfig(torch.optim.AdamW, lr=0.2, weight_decay=0.0)


def test_run_config_optimizer_keys_default_from_pyproject() -> None:
    table = app_config_table()
    config = optimizer_config({}, prefix="client-")
    assert config == OptimizerConfig(
        OPTIMIZERS[table["client-optimizer"]],
        lr=table["client-lr"],
        momentum=table["client-momentum"],
        weight_decay=table["client-weight-decay"],
    )


def test_run_config_optimizer_keys_convert_numbers_to_float() -> None:
    config = optimizer_config(
        {"client-lr": 1, "client-momentum": "0.5", "client-weight-decay": 0}, prefix="client-"
    )
    assert config == OptimizerConfig(torch.optim.SGD, lr=1.0, momentum=0.5, weight_decay=0.0)
    assert all(type(value) is float for value in config.kwargs.values())


def test_run_config_optimizer_keys_are_validated_and_named() -> None:
    with pytest.raises(ValueError, match="client-lr must be positive"):
        optimizer_config({"client-lr": 0}, prefix="client-")
    with pytest.raises(
        ValueError, match="server-optimizer='lbfgs' must be one of sgd, adam, adamw"
    ):
        optimizer_config({"server-optimizer": "lbfgs"}, prefix="server-")
    with pytest.raises(ValueError, match="client-lr"):
        optimizer_config({"client-lr": "fast"}, prefix="client-")


def test_build_sgd_with_the_configured_hyper_parameters() -> None:
    model = tiny_model()
    optimizer = OptimizerConfig(torch.optim.SGD, lr=0.2, momentum=0.7, weight_decay=0.01).build(
        model.parameters()
    )
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.7, 0.01)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_build_returns_a_new_optimizer_each_time() -> None:
    model = tiny_model()
    config = OptimizerConfig(torch.optim.SGD, lr=0.05, momentum=0.9)
    first, second = config.build(model.parameters()), config.build(model.parameters())
    assert first is not second
    train_steps(model, first, 1)
    assert len(first.state) > 0 and len(second.state) == 0


# Variant


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v1", "v1"),
        ("v2", "v2"),
        ("V1", "v1"),
        ("V2", "v2"),
        ("sflv1", "v1"),
        ("SFLV2", "v2"),
        ("SflV1", "v1"),
        (Variant.V1, "v1"),
        (Variant.V2, "v2"),
        ("local-loss", "local-loss"),
        ("Local-Loss", "local-loss"),
    ],
)
def test_variant_validate_accepts_the_variants_in_any_case_v1_and_v2_with_or_without_sfl(
    name: str, expected: str
) -> None:
    assert Variant.validate(name) == expected


@pytest.mark.parametrize("name", ["v3", "", "sfl", "1", "vv1", "sflsflv1", "v1 ", "split", None, 1])
def test_variant_validate_refuses_other_names_and_lists_the_accepted_ones(name: object) -> None:
    with pytest.raises(ValueError, match=r"variant must be one of v1, v2, local-loss; got"):
        Variant.validate(name)  # type: ignore[arg-type]


def test_variant_constants() -> None:
    assert (Variant.V1, Variant.V2) == ("v1", "v2")
    assert Variant.LOCAL_LOSS == "local-loss"
    assert Variant.ALL == ("v1", "v2", "local-loss")


# Optimizer state


def test_sgd_momentum_buffers_survive_save_and_load_exactly() -> None:
    config = OptimizerConfig(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.001)
    model = tiny_model()
    optimizer = config.build(model.parameters())
    train_steps(model, optimizer, 3)
    data = save_optimizer_state(optimizer)
    assert isinstance(data, bytes)

    restored_model = copy.deepcopy(model)
    restored = config.build(restored_model.parameters())
    load_optimizer_state(restored, data)
    pairs = zip(model.parameters(), restored_model.parameters(), strict=True)
    for original_param, restored_param in pairs:
        expected = optimizer.state[original_param]["momentum_buffer"]
        actual = restored.state[restored_param]["momentum_buffer"]
        assert torch.count_nonzero(expected) > 0
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)

    train_steps(model, optimizer, 2, seed=7)
    train_steps(restored_model, restored, 2, seed=7)
    pairs = zip(model.parameters(), restored_model.parameters(), strict=True)
    for original_param, restored_param in pairs:
        assert torch.equal(original_param, restored_param)


def test_restored_momentum_differs_from_a_fresh_optimizer() -> None:
    config = OptimizerConfig(torch.optim.SGD, lr=0.1, momentum=0.9)
    model = tiny_model()
    optimizer = config.build(model.parameters())
    train_steps(model, optimizer, 3)
    fresh_model, restored_model = copy.deepcopy(model), copy.deepcopy(model)
    fresh = config.build(fresh_model.parameters())
    restored = config.build(restored_model.parameters())
    load_optimizer_state(restored, save_optimizer_state(optimizer))
    train_steps(fresh_model, fresh, 1, seed=3)
    train_steps(restored_model, restored, 1, seed=3)
    assert not torch.equal(fresh_model[0].weight, restored_model[0].weight)


def test_adam_state_survives_save_and_load_exactly() -> None:
    config = OptimizerConfig(torch.optim.Adam, lr=0.01)
    model = tiny_model()
    optimizer = config.build(model.parameters())
    train_steps(model, optimizer, 2)
    restored_model = copy.deepcopy(model)
    restored = config.build(restored_model.parameters())
    load_optimizer_state(restored, save_optimizer_state(optimizer))
    pairs = zip(model.parameters(), restored_model.parameters(), strict=True)
    for original_param, restored_param in pairs:
        expected, actual = optimizer.state[original_param], restored.state[restored_param]
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(torch.as_tensor(actual[key]), torch.as_tensor(expected[key])), key


def test_load_optimizer_state_refuses_pickled_objects_other_than_tensors() -> None:
    model = tiny_model()
    optimizer = OptimizerConfig(momentum=0.9).build(model.parameters())
    state = optimizer.state_dict()
    state["param_groups"][0]["extra"] = Unlisted()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with pytest.raises(pickle.UnpicklingError):
        load_optimizer_state(optimizer, buffer.getvalue())
    assert "extra" not in optimizer.param_groups[0]


# AppConfig


def test_pyproject_run_config_gives_exactly_the_app_config_defaults() -> None:
    assert AppConfig.from_run_config(app_config_table()) == AppConfig()


def test_pyproject_run_config_lists_every_app_config_key() -> None:
    simple = {f.name.replace("_", "-") for f in fields(AppConfig)} - {
        "client-optimizer",
        "server-optimizer",
    }
    optimizer_keys = {
        f"{side}-{key}"
        for side in ("client", "server")
        for key in ("optimizer", "lr", "momentum", "weight-decay")
    }
    assert set(app_config_table()) == simple | optimizer_keys


def test_app_config_defaults_are_valid_and_use_sgd_with_momentum() -> None:
    config = AppConfig()
    assert config.variant == Variant.V1
    sgd = OptimizerConfig(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.0)
    assert config.client_optimizer == sgd and config.server_optimizer == sgd


def test_app_config_from_an_empty_run_config_is_the_default() -> None:
    assert AppConfig.from_run_config({}) == AppConfig()


def test_app_config_reads_dashed_keys_into_fields() -> None:
    config = AppConfig.from_run_config(
        {
            "variant": "v2",
            "num-server-rounds": 3,
            "batch-size": 8,
            "cut": "flatten",
            "fraction-train": 0.5,
            "split-server-address": "0.0.0.0:9000",
            "seed": 42,
        }
    )
    assert (config.variant, config.num_server_rounds, config.batch_size, config.cut) == (
        "v2",
        3,
        8,
        "flatten",
    )
    assert (config.fraction_train, config.split_server_address, config.seed) == (
        0.5,
        "0.0.0.0:9000",
        42,
    )
    assert config.local_epochs == AppConfig().local_epochs


def test_app_config_reads_optimizer_keys_over_its_momentum_default() -> None:
    config = AppConfig.from_run_config({"client-lr": 0.2, "server-optimizer": "adam"})
    assert config.client_optimizer == OptimizerConfig(
        torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=0.0
    )
    assert config.server_optimizer == OptimizerConfig(torch.optim.Adam, lr=0.05, weight_decay=0.0)


def test_app_config_refuses_unknown_keys_and_names_them() -> None:
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config({"batch_size": 8, "learning-rate": 0.1, "seed": 1})
    message = str(caught.value)
    assert "unknown run-config keys" in message
    assert "'batch_size'" in message and "'learning-rate'" in message
    assert "'seed'" not in message
    assert "[tool.flwr.app.config]" in message


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("batch-size", "abc", "int"),
        ("fraction-train", "most", "float"),
        ("reset-client-optimizer", "yes", "bool"),
        ("reset-client-optimizer", 1, "bool"),
        ("seed", None, "int"),
        ("num-server-rounds", [3], "int"),
    ],
)
def test_app_config_refuses_values_of_the_wrong_type_and_names_the_key(
    key: str, value: object, kind: str
) -> None:
    expected = f"run-config key '{key}' should be {kind}, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        AppConfig.from_run_config({key: value})


def test_app_config_refuses_a_fractional_value_for_an_integer_key() -> None:
    with pytest.raises(ValueError, match="batch-size"):
        AppConfig.from_run_config({"batch-size": 2.5})


def test_app_config_converts_numeric_strings_and_ints_to_the_field_type() -> None:
    config = AppConfig.from_run_config({"batch-size": "8", "dirichlet-alpha": 1, "cut": 3})
    assert config.batch_size == 8 and type(config.batch_size) is int
    assert config.dirichlet_alpha == 1.0 and type(config.dirichlet_alpha) is float
    assert config.cut == "3"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("false", False),
        ("True", True),
        ("FALSE", False),
        (True, True),
        (False, False),
    ],
)
def test_app_config_accepts_bools_and_bool_strings(value: object, expected: bool) -> None:
    config = AppConfig.from_run_config({"reset-client-optimizer": value})
    assert config.reset_client_optimizer is expected


@pytest.mark.parametrize(
    ("run_config", "complaint"),
    [
        ({"batch-size": 0}, "batch-size=0 must be at least 1"),
        ({"num-server-rounds": -1}, "num-server-rounds=-1 must be at least 1"),
        ({"local-epochs": 0}, "local-epochs=0 must be at least 1"),
        ({"merge-every": 0}, "merge-every=0 must be at least 1"),
        ({"fraction-train": 1.5}, r"fraction-train=1.5 must be in \(0, 1\]"),
        ({"fraction-train": 0.0}, r"fraction-train=0.0 must be in \(0, 1\]"),
        ({"partitioner": "x"}, "partitioner='x' is not known; use one of iid, dirichlet"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha=0.0 must be positive"),
        ({"variant": "v3"}, "variant='v3' must be one of v1, v2, local-loss, fedavg"),
        ({"client-lr": -1}, "client-lr must be positive"),
        ({"server-optimizer": "rmsprop"}, "server-optimizer='rmsprop' must be one of"),
        ({"data-plane-compression": "zip"}, "data-plane-compression='zip' must be one of"),
        ({"client-heads": "mine"}, "client-heads='mine' must be one of 'shared', 'local'"),
        ({"client-heads": "local"}, "set label-private=true, or leave client-heads='shared'"),
        (
            {"client-heads": "local", "label-private": True, "fraction-evaluate": 0.0},
            "fraction-evaluate must be above 0",
        ),
        ({"leakage-threshold": 1.5}, r"leakage-threshold=1.5 must be in \[0, 1\]"),
        (
            {"leakage-label-threshold": -0.1, "label-private": True},
            r"leakage-label-threshold=-0.1 must be in \[0, 1\] \(a share of labels recovered",
        ),
        ({"leakage-label-threshold": 0.5}, "leakage-label-threshold applies to the label-private"),
        ({"leakage-action": "halt"}, "leakage-action='halt' must be one of 'warn', 'stop'"),
        ({"leakage-steps": 0}, "leakage-steps=0 must be at least 1"),
        (
            {"leakage-monitor": True, "variant": "fedavg"},
            "leakage-monitor=true watches what crosses the cut",
        ),
        ({"variant": "local-loss", "send-every": 0}, "send-every=0 must be at least 1"),
        ({"send-every": 2}, "send-every=2 applies to variant='local-loss' only"),
        ({"server-copies": "per-client"}, "server-copies='per-client' applies to variant="),
        ({"variant": "local-loss", "server-copies": "all"}, "server-copies='all' must be one of"),
        ({"variant": "local-loss", "aux-head": "conv"}, "aux-head='conv' must be one of linear"),
        (
            {"variant": "local-loss", "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0},
            "auxiliary head reaches the aggregator too",
        ),
        (
            {"split-server-insecure": False, "split-server-certfile": "s.crt"},
            "split-server-insecure=false needs split-server-keyfile, split-server-ca-certfile",
        ),
        (
            {"split-server-keyfile": "s.key"},
            "split-server-insecure=true ignores the TLS files given",
        ),
    ],
)
def test_app_config_refuses_invalid_values(run_config: dict, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        AppConfig.from_run_config(run_config)


def test_app_config_reports_every_invalid_value_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config({"batch-size": 0, "fraction-train": 1.5, "partitioner": "x"})
    message = str(caught.value)
    assert message.startswith("invalid run config: ")
    assert (
        "batch-size=0" in message
        and "fraction-train=1.5" in message
        and "partitioner='x'" in message
    )


def test_app_config_accepts_sfl_variant_names() -> None:
    assert Variant.validate(AppConfig.from_run_config({"variant": "SFLV2"}).variant) == "v2"


@pytest.mark.parametrize(
    ("run_config", "key"),
    [
        ({"smashed-noise-multiplier": 0.5}, "smashed-clip-norm"),
        ({"label-noise-multiplier": 1.0}, "label-private=true"),
        ({"dp-noise-multiplier": 1.0}, "dp-max-grad-norm"),
        ({"privacy-delta": 0.0}, "privacy-delta"),
    ],
)
def test_the_librarys_privacy_errors_reach_the_app_in_run_config_keys(run_config, key) -> None:
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config(run_config)
    message = str(caught.value)
    assert key in message
    assert not re.search(r"\b(smashed_clip_norm|dp_max_grad_norm|server_cut|(?<!-)delta=)", message)
