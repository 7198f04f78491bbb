"""The library as a user installs it: one import root, typed, light to import, layered one way.

The wheel is built from this repository and inspected; a user's own Flower app that imports only
``splitfed`` runs under ``flwr run`` against that wheel installed outside the repository.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from flwr.serverapp.strategy import Strategy

import splitfed
from splitfed import SplitFed
from tests.conftest import assert_none_left, marked_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("flwr_splitfed-*.whl")
    return built


def test_the_wheel_installs_one_import_root_with_its_strategies_and_type_marker(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    roots = {name.split("/")[0] for name in names if not name.startswith("flwr_splitfed-")}
    assert roots == {"splitfed"}
    assert "splitfed/py.typed" in names
    assert "splitfed/strategies/splitfed.py" in names  # the strategies/ folder, under splitfed
    assert not any(name.startswith(("simulation", "tests", "strategies/")) for name in names)


def test_the_wheel_requires_neither_ray_nor_the_apps_data_libraries(wheel):
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    )
    required = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(re.match(r"[\w.-]+", r).group() for r in required) == [
        "flwr",
        "grpcio",
        "numpy",
        "torch",
    ]
    assert not any("simulation" in r for r in required)


def test_importing_the_library_loads_no_app_dependency(tmp_path):
    code = (
        "import sys, splitfed\n"
        "heavy = ['ray', 'sklearn', 'flwr_datasets', 'datasets', 'matplotlib', 'opacus', "
        "'scipy', 'simulation']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    shown = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert shown.stdout.strip() == "[]"


def test_everything_public_is_importable_from_the_root():
    for name in splitfed.__all__:
        assert getattr(splitfed, name) is not None, name
    assert {"SplitFed", "split_model", "train_client_half", "evaluate_client_half"} <= set(
        splitfed.__all__
    )


def test_only_the_library_is_importable_from_an_editable_install(tmp_path):
    # The repository is not on sys.path outside it: `tests` and `simulation` are not importable.
    # -I: only the install decides (no PYTHONPATH, no current directory on sys.path).
    code = (
        "import importlib.util as u\n"
        "print([u.find_spec(m) is None for m in ('tests', 'simulation')])\n"
    )
    shown = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert shown.stdout.strip() == "[True, True]"


def test_splitfed_start_takes_exactly_what_flowers_strategy_start_takes():
    ours = inspect.signature(SplitFed.start).parameters
    flowers = inspect.signature(Strategy.start).parameters
    assert list(ours) == list(flowers)
    assert [p.default for p in ours.values()] == [p.default for p in flowers.values()]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
    return found


def test_imports_point_one_way_simulation_strategies_core():
    core = [p for p in (REPO_ROOT / "splitfed").glob("*.py") if p.name != "__init__.py"]
    for path in core:
        for name in _imports(path):
            assert not name.startswith((".strategies", "splitfed.strategies", "strategies")), (
                f"{path.name} (core) imports the strategy layer: {name}"
            )
            assert not name.startswith("simulation"), f"{path.name} imports the app: {name}"
    for path in (REPO_ROOT / "strategies").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith("simulation"), f"strategies/{path.name} imports {name}"


@pytest.mark.slow
def test_the_library_passes_the_type_checker():
    checked = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success: no issues found" in checked.stdout


USER_APP = '''
"""A user's own Flower app: the README's model (a skip connection, not Sequential) cut by a
module's name, dict batches, clients that build on meta; only `splitfed` imported."""
import torch, torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from torch import nn

import splitfed

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

def cut(model):
    return splitfed.split_model(model, cut="stem", sample_input=torch.zeros(2, 3, 8, 8))

def batches(seed):  # dict batches, as flwr-datasets gives them; the label is the brightest channel
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(4):
        img = torch.rand(8, 3, 8, 8, generator=g)
        label = torch.randint(0, 3, (8,), generator=g)
        img[torch.arange(8), label] += 1.0
        out.append({"img": img, "label": label})
    return out

server = ServerApp()
client = ClientApp()

@server.main()
def main(grid, context):
    print("splitfed from", splitfed.__file__)
    torch.manual_seed(0)
    split = cut(Net())
    strategy = splitfed.SplitFed(split=split, insecure=True)
    def evaluate(server_round, arrays):  # Flower's evaluate_fn(server_round, arrays)
        model = strategy.global_model(arrays).eval()
        test = batches(99)
        correct = sum(int((model(b["img"]).argmax(1) == b["label"]).sum()) for b in test)
        return MetricRecord({"accuracy": correct / 32})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(split.client_state_dict()),
                            num_rounds=3, evaluate_fn=evaluate)
    print("user app accuracy", result.evaluate_metrics_serverapp[3]["accuracy"])
    print("user app federated", dict(result.evaluate_metrics_clientapp[3]))
    assert set(strategy.global_model(result.arrays).state_dict()) == set(Net().state_dict())

def client_side():
    with torch.device("meta"):
        return cut(Net()).materialize_client()

@client.train()
def train(msg, context):
    optimizer = splitfed.OptimizerConfig(torch.optim.SGD, lr=0.1)
    loader = batches(context.node_id % 7)
    return splitfed.train_client_half(msg, context, split=client_side(), train_loader=loader,
                                      optimizer=optimizer)

@client.evaluate()
def evaluate(msg, context):
    return splitfed.evaluate_client_half(msg, context, split=client_side(), loader=batches(98))
'''

USER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "user-app"
version = "1.0.0"
dependencies = ["flwr-splitfed"]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "user_app:server"
clientapp = "user_app:client"
"""


@pytest.mark.slow
def test_a_users_own_app_runs_under_flwr_run_against_the_installed_wheel(
    wheel, tmp_path, monkeypatch
):
    from simulation.launch.simulation_engine import run_app

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    app = tmp_path / "user_app_dir"
    app.mkdir()
    (app / "user_app.py").write_text(textwrap.dedent(USER_APP))
    (app / "pyproject.toml").write_text(USER_PYPROJECT)
    assert len(USER_APP.strip().splitlines()) < 70
    # The installed wheel comes first on the path of every process Flower starts.
    monkeypatch.setenv("PYTHONPATH", str(site))
    with marked_environment() as marker:
        result = run_app(
            app_dir=app,
            run_config={},
            num_supernodes=3,
            clients_at_once=2,
            output_dir=tmp_path / "out",
            echo=False,
            timeout=600,
        )
    assert_none_left(marker, "the user's app")
    assert result.completed, result.failure_report()
    assert f"splitfed from {site}/splitfed/__init__.py" in result.log
    accuracy = float(result.log.split("user app accuracy ")[1].split()[0])
    assert accuracy > 0.6, result.log[-3000:]  # three classes: chance is a third
    assert "'eval-accuracy'" in result.log  # federated evaluation ran on the user's clients
