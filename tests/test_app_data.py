"""The app's data sources, partitioners, batches and models (simulation/app/datasets.py, models.py).

Every source is read offline: scikit-learn's bundled sets, files the tests write, and a hub
dataset whose download alone is replaced by a small local ``DatasetDict``.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

# Read by huggingface_hub and flwr_datasets when first imported: no hub, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import fx, nn  # noqa: E402
from torch.fx.passes.split_module import split_module  # noqa: E402

from simulation.app.datasets import (  # noqa: E402
    PARTITIONERS,
    DataConfig,
    FederatedData,
    load_federated,
    loader,
    write_image_folder,
)
from simulation.app.models import (  # noqa: E402
    DEFAULT_CUTS,
    build_model,
    residual_cnn,
    tabular_mlp,
)

NUM_PARTITIONS = 10


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=30)


def rows(data: datasets.Dataset, input_key: str, label_key: str = "label") -> Counter:
    """The multiset of (input bytes, label) rows of a torch-format dataset."""
    columns = data[:]
    return Counter(
        (x.numpy().tobytes(), int(y))
        for x, y in zip(columns[input_key], columns[label_key], strict=True)
    )


def label_shares(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    return counts / counts.sum()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


# -- partitioners -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")  # pyarrow, in sort
@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_disjoint_cover_the_train_split_and_skew_as_their_kind(partitioner):
    config = DataConfig(dataset="digits", partitioner=partitioner, dirichlet_alpha=0.2)
    data = load_federated(config, num_partitions=NUM_PARTITIONS)
    train = data.train_split()
    parts = [data.train_partition(i) for i in range(NUM_PARTITIONS)]
    assert all(len(part) > 0 for part in parts)

    whole, together = rows(train, data.input_key), Counter()
    for part in parts:
        together += rows(part, data.input_key)
    assert not together - whole, "a row is in two partitions or not in the train split"
    left_out = sum((whole - together).values())
    if partitioner == "shard":
        # flwr-datasets' shards are len // (partitions * shards) rows; the remainder is unused.
        assert left_out == len(train) % (NUM_PARTITIONS * config.shards_per_partition)
    else:
        assert left_out == 0

    overall = label_shares(train[:]["label"], data.num_classes)
    distances = [total_variation(label_shares(p[:]["label"], 10), overall) for p in parts]
    distinct = [len(set(p[:]["label"].tolist())) for p in parts]
    if partitioner == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert max(distances) < 0.2, distances
    elif partitioner == "dirichlet":
        assert np.mean(distances) > 0.4, distances
    elif partitioner == "pathological":
        assert max(distinct) <= config.classes_per_partition
        for i, part in enumerate(parts):
            # Tested on the classes it trains on.
            assert set(data.test_partition(i)[:]["label"].tolist()) <= set(
                part[:]["label"].tolist()
            )
    else:
        # Each shard is label-sorted rows: a partition of 2 shards holds at most 4 classes.
        assert max(distinct) <= 2 * config.shards_per_partition
        assert np.mean(distances) > 0.4, distances

    test_parts = Counter()
    for i in range(NUM_PARTITIONS):
        test_parts += rows(data.test_partition(i), data.input_key)
    central_inputs, central_labels = data.central_test()
    central = Counter(
        (x.numpy().tobytes(), int(y)) for x, y in zip(central_inputs, central_labels, strict=True)
    )
    assert not test_parts - central
    assert not (whole & central), "a held-out row is also a train row"


# -- bundled sets -----------------------------------------------------------------------------


def test_digits_and_breast_cancer_load_offline_with_their_shapes_and_classes():
    digits = load_federated(DataConfig(dataset="digits"), num_partitions=2)
    inputs, labels = digits.central_test()
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert digits.sample_input().shape == (2, 1, 8, 8)
    assert len(digits.train_split()) + len(labels) == 1797
    assert inputs.dtype == torch.float32
    assert float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0
    # Stratified: every class is held out in proportion, up to rounding.
    train_counts = np.bincount(digits.train_split()[:]["label"].numpy(), minlength=10)
    test_counts = np.bincount(labels.numpy(), minlength=10)
    shares = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(shares - 0.2) < 0.02), shares

    cancer = load_federated(DataConfig(dataset="breast-cancer"), num_partitions=2)
    assert cancer.num_classes == 2 and cancer.input_key == "features"
    assert cancer.input_shape == (30,)
    assert cancer.class_names == ("malignant", "benign")
    assert len(cancer.train_split()) + len(cancer.central_test()[1]) == 569


def test_breast_cancer_is_standardised_with_train_statistics_only():
    from sklearn.datasets import load_breast_cancer

    data = load_federated(DataConfig(dataset="breast-cancer"), num_partitions=3)
    train = data.train_split()[:]["features"].double()
    test = data.central_test()[0].double()
    # Train statistics alone: the train split comes out at exactly zero mean and unit variance,
    # which it would not if the held-out rows had counted.
    assert torch.allclose(train.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        train.std(0, unbiased=False), torch.ones(30, dtype=torch.float64), atol=1e-4
    )
    assert float(test.mean(0).abs().max()) > 0.01

    raw = load_federated(DataConfig(dataset="breast-cancer", standardize=False), num_partitions=3)
    raw_train = raw.train_split()[:]["features"].double()
    raw_test = raw.central_test()[0].double()
    mean, std = raw_train.mean(0), raw_train.std(0, unbiased=False)
    assert torch.allclose((raw_test - mean) / std, test, atol=1e-4)
    sklearn_rows = {row.tobytes() for row in load_breast_cancer().data.astype(np.float32)}
    loaded = torch.cat([raw.train_split()[:]["features"], raw.central_test()[0]])
    assert {row.numpy().tobytes() for row in loaded} == sklearn_rows


# -- local files ------------------------------------------------------------------------------


def write_table(path: Path, count: int, *, seed: int, labels: list, start: int = 0) -> list[dict]:
    """Rows ``uid, height, weight, label`` in a csv or parquet file; uids from ``start``."""
    rng = np.random.default_rng(seed)
    table = [
        {
            "uid": start + i,
            "height": float(np.round(rng.normal(170, 10), 2)),
            "weight": float(np.round(rng.normal(70, 5), 2)),
            "label": labels[i % len(labels)],
        }
        for i in range(count)
    ]
    if path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    else:
        pq.write_table(pa.Table.from_pylist(table), path)
    return table


def by_uid(data: FederatedData) -> dict[int, tuple[list[float], int]]:
    """Every loaded row, train and held-out, by its first feature (the uid)."""
    train = data.train_split()[:]
    inputs = torch.cat([train[data.input_key], data.central_test()[0]])
    labels = torch.cat([train["label"], data.central_test()[1]])
    found = {int(x[0]): (x.tolist(), int(y)) for x, y in zip(inputs, labels, strict=True)}
    assert len(found) == len(labels), "a row was loaded twice"
    return found


def test_csv_and_parquet_files_load_through_the_same_path(tmp_path, cache_dir):
    table = write_table(tmp_path / "train.csv", 80, seed=1, labels=[0, 1, 2])
    table += write_table(tmp_path / "test.csv", 20, seed=2, labels=[2, 1, 0], start=1000)
    config = DataConfig(
        dataset="csv",
        data_files=f"train={tmp_path / 'train.csv'},test={tmp_path / 'test.csv'}",
        standardize=False,
        cache_dir=cache_dir,
    )
    data = load_federated(config, num_partitions=2)
    assert data.num_classes == 3 and data.input_shape == (3,)  # uid, height, weight
    assert data.central_test()[0][:, 0].min() >= 1000, "the test file is the held-out split"
    found = by_uid(data)
    assert sorted(found) == [row["uid"] for row in table]
    for row in table:
        features, label = found[row["uid"]]
        assert features == pytest.approx([row["uid"], row["height"], row["weight"]], abs=1e-4)
        assert label == row["label"]

    table = write_table(tmp_path / "pets.parquet", 60, seed=3, labels=["dog", "cat", "bird"])
    config = DataConfig(
        dataset="parquet",
        data_files=str(tmp_path / "pets.parquet"),
        input_key="uid,height,weight",
        standardize=False,
        cache_dir=cache_dir,
    )
    data = load_federated(config, num_partitions=2)
    assert data.class_names == ("bird", "cat", "dog")
    assert len(data.train_split()) == 48 and len(data.central_test()[1]) == 12
    found = by_uid(data)
    assert sorted(found) == list(range(60))
    for row in table:
        features, label = found[row["uid"]]
        assert features == pytest.approx([row["uid"], row["height"], row["weight"]], abs=1e-4)
        assert data.class_names[label] == row["label"]

    # Standardised by default, with the train split's statistics.
    scaled = load_federated(
        replace(config, input_key="height,weight", standardize=True), num_partitions=2
    )
    heights = scaled.train_split()[:]["features"][:, 0].double()
    assert abs(float(heights.mean())) < 1e-5 and float(
        heights.std(unbiased=False)
    ) == pytest.approx(1, abs=1e-4)


def test_image_folder_loads_as_chw_tensors_in_unit_range_with_its_labels(image_root, cache_dir):
    config = DataConfig(
        dataset="imagefolder", data_dir=str(image_root), image_size=16, cache_dir=cache_dir
    )
    data = load_federated(config, num_partitions=3)
    assert data.class_names == ("class_00", "class_01", "class_02")
    assert data.input_key == "image" and data.input_shape == (3, 16, 16)
    train = data.train_split()[:]
    test_inputs, test_labels = data.central_test()
    assert len(test_labels) == 3 * 10, "the test/ folder is the held-out split"
    assert np.bincount(train["label"].numpy()).tolist() == [30, 30, 30]
    for images in (train["image"], test_inputs):
        assert images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # Each class has its own colour: labels that travelled with their images are recovered
    # from the mean colour alone.
    colours = train["image"].mean(dim=(2, 3))
    centroids = torch.stack([colours[train["label"] == c].mean(0) for c in range(3)])
    nearest = torch.cdist(test_inputs.mean(dim=(2, 3)), centroids).argmin(1)
    assert torch.equal(nearest, test_labels)
    # write_image_folder colours class_00 red, class_01 green, class_02 blue.
    assert centroids.argmax(1).tolist() == [0, 1, 2]

    # Class folders without train/ and test/: a stratified test-fraction is held out.
    flat = load_federated(
        replace(config, data_dir=str(image_root / "train"), test_fraction=0.2), num_partitions=3
    )
    assert flat.class_names == data.class_names
    assert np.bincount(flat.central_test()[1].numpy()).tolist() == [6, 6, 6]
    assert len(flat.train_split()) == 72


def test_a_hub_dataset_by_name_loads_with_only_its_download_replaced(monkeypatch, cache_dir):
    """The hub is not reachable here; only its download is replaced.

    ``datasets.load_dataset``, which ``FederatedDataset`` calls to fetch ``ylecun/mnist``,
    returns a small ``DatasetDict`` with MNIST's schema (28x28 grey PIL images, ``ClassLabel``);
    shuffling, the held-out split, conversion and partitioning are the real code. Each image's
    grey level encodes its label, so a label separated from its image shows.
    """
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(count: int) -> datasets.Dataset:
        labels = [i % 10 for i in range(count)]
        images = [Image.new("L", (28, 28), color=20 * label + 5) for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    calls = []

    def download(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict({"train": split(200), "test": split(50)})

    monkeypatch.setattr(datasets, "load_dataset", download)
    config = DataConfig(
        dataset="hub:ylecun/mnist", partitioner="dirichlet", seed=3, cache_dir=cache_dir
    )
    data = load_federated(config, num_partitions=4)
    assert [(path, name) for path, name, _ in calls] == [("ylecun/mnist", None)]
    assert calls[0][2] == {"cache_dir": cache_dir}
    assert data.num_classes == 10 and data.input_key == "image"
    assert data.input_shape == (1, 32, 32), "resized to image-size, one channel for grey"
    inputs, labels = data.central_test()
    assert len(labels) == 50
    for part in [*(data.train_partition(i) for i in range(4)), data.test_partition(0)]:
        columns = part[:]
        grey = torch.round(columns["image"].mean(dim=(1, 2, 3)) * 255)
        assert torch.equal(((grey - 5) / 20).round().long(), columns["label"])
    assert sum(len(data.train_partition(i)) for i in range(4)) == 200


# -- batches ----------------------------------------------------------------------------------


def test_loader_yields_dict_batches_of_every_row_once():
    data = load_federated(DataConfig(dataset="digits"), num_partitions=4)
    part = data.train_partition(1)
    batches = list(loader(part, batch_size=64, shuffle_seed=None))
    assert all(set(batch) == {"image", "label"} for batch in batches)
    assert [len(b["label"]) for b in batches] == [64] * (len(part) // 64) + (
        [len(part) % 64] if len(part) % 64 else []
    )
    assert batches[0]["image"].shape == (64, 1, 8, 8) and batches[0]["label"].dtype == torch.int64
    in_order = torch.cat([b["label"] for b in batches])
    assert torch.equal(in_order, part[:]["label"])

    def order(seed):
        return torch.cat([b["label"] for b in loader(part, batch_size=50, shuffle_seed=seed)])

    assert torch.equal(order(7), order(7))
    assert not torch.equal(order(7), order(8))
    assert sorted(order(7).tolist()) == sorted(in_order.tolist())


# -- models -----------------------------------------------------------------------------------


class KeepWhole(fx.Tracer):
    """Traces into every module but the named ones, which stay single calls."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.names or super().is_leaf_module(module, qualified_name)


def cut_at(model: nn.Module, cuts: tuple[str, ...], x: torch.Tensor) -> list[int]:
    """Split ``model``'s traced graph after each named module's call; return, per later piece,
    how many values cross into it. Checks that the pieces compute the model."""
    graph = fx.GraphModule(model, KeepWhole(cuts).trace(model))
    nodes = list(graph.graph.nodes)
    ends = []
    for name in cuts:
        calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name]
        assert calls, f"{name!r} is not called in forward()"
        ends.append(max(calls))
    piece = {n: sum(i > end for end in ends) for i, n in enumerate(nodes)}
    pieces = split_module(graph, model, lambda n: piece[n], keep_original_order=True)
    model.eval()
    assert torch.equal(pieces(x), model(x))
    return [
        sum(n.op == "placeholder" for n in getattr(pieces, f"submod_{k}").graph.nodes)
        for k in range(1, len(cuts) + 1)
    ]


def test_models_have_the_right_outputs_and_the_modules_their_cuts_name():
    x = torch.rand(4, 3, 32, 32)
    resnet = residual_cnn(num_classes=7)
    assert resnet(x).shape == (4, 7)
    assert residual_cnn(in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert not isinstance(resnet, nn.Sequential)
    mlp = tabular_mlp(num_features=30, num_classes=2)
    assert mlp(torch.rand(5, 30)).shape == (5, 2)

    for name, model, sample in (("resnet", resnet, x), ("mlp", mlp, torch.rand(5, 30))):
        cut, server_cut = DEFAULT_CUTS[name]
        modules = dict(model.named_modules())
        assert cut in modules and server_cut in modules
        # A cut at a module passes its output alone to the next piece.
        assert cut_at(model, (cut, server_cut), sample) == [1, 1]

    def size(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    client = size(resnet.conv1, resnet.bn1, resnet.layer1)
    assert client < 0.15 * size(resnet.layer2, resnet.layer3)


def test_build_model_sizes_models_for_the_data_and_refuses_what_it_cannot_build():
    digits = load_federated(DataConfig(dataset="digits"), num_partitions=2)
    model = build_model(
        "resnet", num_classes=digits.num_classes, sample_input=digits.sample_input()
    )
    assert model(digits.sample_input()).shape == (2, 10)
    cancer = load_federated(DataConfig(dataset="breast-cancer"), num_partitions=2)
    mlp = build_model("mlp", num_classes=2, sample_input=cancer.sample_input())
    assert mlp.fc1.in_features == 30 and mlp(cancer.sample_input()).shape == (2, 2)

    cnn = build_model("cnn", num_classes=10, sample_input=digits.sample_input())
    assert cnn(digits.sample_input()).shape == (2, 10)
    with pytest.raises(ValueError, match="cnn, resnet, mlp"):
        build_model("vit", num_classes=10, sample_input=digits.sample_input())
    with pytest.raises(ValueError, match="model='mlp'"):
        build_model("resnet", num_classes=2, sample_input=cancer.sample_input())


def test_residual_cnn_learns_the_image_folder(image_root, cache_dir):
    config = DataConfig(dataset="imagefolder", data_dir=str(image_root), cache_dir=cache_dir)
    data = load_federated(config, num_partitions=1)
    torch.manual_seed(0)
    model = residual_cnn(num_classes=data.num_classes, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(4):
        for batch in loader(data.train_partition(0), batch_size=32, shuffle_seed=epoch):
            loss = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    model.eval()
    inputs, labels = data.central_test()
    with torch.no_grad():
        accuracy = float((model(inputs).argmax(1) == labels).float().mean())
    assert accuracy > 0.8, accuracy


# -- errors -----------------------------------------------------------------------------------


def test_bad_configs_fail_with_errors_that_name_the_fix(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="iid, dirichlet, pathological, shard") as err:
        DataConfig(dataset="digits", partitioner="round-robin", test_fraction=1.5).validate()
    assert "test-fraction=1.5" in str(err.value), "every problem is listed"
    with pytest.raises(ValueError, match="needs data-dir"):
        load_federated(DataConfig(dataset="imagefolder"), num_partitions=2)
    with pytest.raises(ValueError, match="is not a folder; give the absolute path"):
        load_federated(
            DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "missing")),
            num_partitions=2,
        )
    with pytest.raises(ValueError, match="digits, breast-cancer, parquet, csv, imagefolder"):
        DataConfig(dataset="cifar").validate()
    with pytest.raises(ValueError, match="set dataset to parquet, csv or imagefolder"):
        DataConfig(dataset="digits", data_files="digits.csv").validate()
    with pytest.raises(ValueError, match="partition-id 5 is outside 0..1"):
        load_federated(DataConfig(dataset="digits"), num_partitions=2).train_partition(5)

    path = tmp_path / "two-labels.csv"
    path.write_text("a,b,label,target\n" + "".join(f"{i},{i},{i % 2},{i % 2}\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"several label columns \['label', 'target'\].*label-key"):
        load_federated(
            DataConfig(dataset="csv", data_files=str(path), cache_dir=cache_dir), num_partitions=2
        )
    path = tmp_path / "named.csv"
    path.write_text("name,a,label\n" + "".join(f"n{i},{i},{i % 2}\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"\['name', 'a'\].*set input-key"):
        load_federated(
            DataConfig(dataset="csv", data_files=str(path), cache_dir=cache_dir), num_partitions=2
        )
    with pytest.raises(ValueError, match="set label-key"):
        load_federated(
            DataConfig(dataset="csv", data_files=str(path), label_key="nope", cache_dir=cache_dir),
            num_partitions=2,
        )
