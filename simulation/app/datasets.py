"""The app's data: one loading path for bundled, local and hub datasets, partitioned with Flower.

Every source ends up as a ``datasets.DatasetDict`` with a ``train`` and a ``test`` split:
scikit-learn's bundled ``digits`` and ``breast-cancer`` are built in memory; ``parquet``,
``csv`` and ``imagefolder`` files and ``hub:<name>`` datasets are loaded by
``flwr_datasets.FederatedDataset``. From there all take the same path: where a source has no
``test`` split, a stratified ``test-fraction`` is held out; the inputs become float tensors
(images ``C x H x W`` in [0, 1], table rows a feature vector) and the labels class ids; and a
``flwr_datasets`` partitioner splits ``train`` (and, the same way, ``test``) among the clients.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

__all__ = [
    "EMBEDDED_SOURCES",
    "FILE_SOURCES",
    "HUB_PREFIX",
    "PARTITIONERS",
    "DataConfig",
    "FederatedData",
    "load_federated",
    "loader",
    "make_partitioner",
    "write_image_folder",
]

EMBEDDED_SOURCES = ("digits", "breast-cancer")
"""Datasets bundled with scikit-learn: they load without any download."""

FILE_SOURCES = ("parquet", "csv", "imagefolder")
"""Local files, read by ``datasets.load_dataset`` through ``flwr_datasets.FederatedDataset``."""

HUB_PREFIX = "hub:"
"""``dataset="hub:<name>"`` loads a Hugging Face Hub dataset by name, e.g. ``hub:ylecun/mnist``."""

PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
"""Partitioner names the run config accepts (key ``partitioner``)."""

LABEL_CANDIDATES = ("label", "labels", "target", "y")
"""Columns taken as the label when ``label-key`` is not set."""

IMAGE_CANDIDATES = ("img", "image")
"""Columns taken as the input when ``input-key`` is not set."""

LABEL_KEY = "label"
"""Batch key of the class ids, whatever the source calls its label column: the partitioners
are made, with the column they split by, before the source is read."""

TABULAR_KEY = "features"
"""Batch key of table rows stacked into one feature vector."""

_SINGLE_CHANNEL_MODES = ("1", "L", "LA", "I", "I;16", "F")
# Images in these PIL modes become one channel (grey); any other mode becomes RGB.


class DataConfigError(ValueError):
    """The data part of a run config is not valid; :attr:`problems` lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid data config:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split; each field is the run-config key of the
    same name with ``-`` for ``_``.

    Parameters
    ----------
    dataset : str
        ``"digits"``, ``"breast-cancer"``, ``"parquet"``, ``"csv"``, ``"imagefolder"`` or
        ``"hub:<name>"`` (a Hugging Face Hub dataset, e.g. ``"hub:uoft-cs/cifar10"``).
    data_files : str
        Files for ``parquet`` and ``csv`` (and optionally the others): a path or glob, or
        ``"train=PATH,test=PATH"`` to name the splits. (default: ``""``)
    data_dir : str
        A folder: for ``imagefolder`` the one holding ``train/<class>/...`` (and optionally
        ``test/<class>/...``) or just ``<class>/...``. (default: ``""``)
    data_subset : str
        The configuration of a hub dataset that has several. (default: ``""``)
    input_key : str
        The input column, or a comma-separated list of numeric columns for table rows; empty
        to detect it (``img``/``image``, the single other column, or all other columns when
        all are numeric). (default: ``""``)
    label_key : str
        The label column; empty to detect it (``label``, ``labels``, ``target``, ``y``).
        (default: ``""``)
    partitioner : str
        ``"iid"``, ``"dirichlet"``, ``"pathological"`` or ``"shard"``. (default: ``"iid"``)
    dirichlet_alpha : float
        Concentration of the Dirichlet partitioner; smaller is more skewed. (default: 0.5)
    classes_per_partition : int
        Classes each client gets from the pathological partitioner. (default: 2)
    shards_per_partition : int
        Label-sorted shards each client gets from the shard partitioner. (default: 2)
    test_fraction : float
        Share of the examples held out, stratified by label, where a source has no ``test``
        split. (default: 0.2)
    seed : int
        Seed of the shuffle, the held-out split and the partitioners. (default: 0)
    image_size : int
        Side, in pixels, images (PIL) are resized to; array inputs, such as ``digits``,
        keep their shape. (default: 32)
    standardize : bool
        Scale table features to zero mean and unit variance with the train split's
        statistics. (default: True)
    cache_dir : str
        Where ``datasets`` caches loaded files; empty for its default. (default: ``""``)
    """

    dataset: str
    data_files: str = ""
    data_dir: str = ""
    data_subset: str = ""
    input_key: str = ""
    label_key: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    shards_per_partition: int = 2
    test_fraction: float = 0.2
    seed: int = 0
    image_size: int = 32
    standardize: bool = True
    cache_dir: str = ""

    def validate(self) -> DataConfig:
        """Check every field; raise one ``ValueError`` that lists every problem.

        Returns
        -------
        DataConfig
            ``self``, for chaining.
        """
        problems: list[str] = []
        source = self.dataset
        if source.startswith(HUB_PREFIX):
            if not source[len(HUB_PREFIX) :].strip():
                problems.append("dataset='hub:' needs a dataset name, e.g. 'hub:ylecun/mnist'")
        elif source not in EMBEDDED_SOURCES + FILE_SOURCES:
            problems.append(
                f"dataset={source!r} is not known; use one of "
                f"{', '.join(EMBEDDED_SOURCES + FILE_SOURCES)} or 'hub:<name>'"
            )
        if source in FILE_SOURCES and not (self.data_files or self.data_dir):
            what = "data-files (a path, a glob or 'train=PATH,test=PATH')"
            if source == "imagefolder":
                what = "data-dir (a folder of class folders)"
            problems.append(f"dataset={source!r} needs {what}")
        if source in EMBEDDED_SOURCES and (self.data_files or self.data_dir):
            problems.append(
                f"dataset={source!r} is bundled and reads no files; clear data-files and "
                "data-dir, or set dataset to parquet, csv or imagefolder"
            )
        if source in FILE_SOURCES:
            # A hub dataset's data-dir and data-files are paths inside its repository.
            if self.data_dir and not Path(self.data_dir).expanduser().is_dir():
                problems.append(
                    f"data-dir={self.data_dir!r} is not a folder; give the absolute path of an "
                    "existing folder"
                )
            problems.extend(_missing_files(self.data_files))
        if self.partitioner not in PARTITIONERS:
            problems.append(
                f"partitioner={self.partitioner!r} is not known; use one of "
                f"{', '.join(PARTITIONERS)}"
            )
        if not self.dirichlet_alpha > 0:
            problems.append(f"dirichlet-alpha={self.dirichlet_alpha} must be positive")
        for key, value in (
            ("classes-per-partition", self.classes_per_partition),
            ("shards-per-partition", self.shards_per_partition),
            ("image-size", self.image_size),
        ):
            if value < 1:
                problems.append(f"{key}={value} must be at least 1")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append(f"test-fraction={self.test_fraction} must be between 0 and 1")
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be at least 0")
        if problems:
            raise DataConfigError(problems)
        return self


def _split_files(data_files: str) -> dict[str, str] | str:
    """``"train=a.csv,test=b.csv"`` as a dict of splits; a single path or glob as is."""
    if "=" not in data_files:
        return data_files
    splits = {}
    for item in data_files.split(","):
        split, sep, path = item.partition("=")
        if not sep or not split.strip() or not path.strip():
            raise ValueError(
                f"data-files={data_files!r}: {item!r} is not SPLIT=PATH; write "
                "'train=PATH,test=PATH' or a single path"
            )
        splits[split.strip()] = path.strip()
    return splits


def _missing_files(data_files: str) -> list[str]:
    if not data_files:
        return []
    try:
        files = _split_files(data_files)
    except ValueError as err:
        return [str(err)]
    paths = files.values() if isinstance(files, dict) else [files]
    return [
        f"data-files: nothing matches {path!r}; give the absolute path of existing files"
        for path in paths
        if not glob.glob(str(Path(path).expanduser()))
    ]


def make_partitioner(
    config: DataConfig, *, num_partitions: int, partition_by: str = "label"
) -> Partitioner:
    """A new, seeded ``flwr_datasets`` partitioner of the kind ``config.partitioner`` names.

    Parameters
    ----------
    config : DataConfig
        Names the partitioner and its parameters.
    num_partitions : int
        The number of clients.
    partition_by : str
        The label column the label-skewed partitioners split by. (default: ``"label"``)

    Returns
    -------
    Partitioner
        A partitioner without a dataset; assign one with ``partitioner.dataset = ...``.
    """
    name = config.partitioner
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        # A client needs one example; larger minimums make small held-out splits unsplittable.
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            alpha=float(config.dirichlet_alpha),
            min_partition_size=1,
            seed=config.seed,
        )
    if name == "pathological":
        # "first-deterministic" gives partition i the class i first, so with at least as many
        # partitions as classes every class is used; the train and test splits of a client
        # get the same classes (same seed, same labels).
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            num_classes_per_partition=config.classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=config.seed,
        )
    if name == "shard":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            num_shards_per_partition=config.shards_per_partition,
            seed=config.seed,
        )
    raise ValueError(f"partitioner={name!r} is not known; use one of {', '.join(PARTITIONERS)}")


# -- embedded sources -------------------------------------------------------------------------


def _digits() -> DatasetDict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    features = Features(
        {
            "image": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
            "label": ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    data = Dataset.from_dict({"image": images, "label": digits.target}, features=features)
    return DatasetDict({"train": data})


def _breast_cancer() -> DatasetDict:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    columns: dict[str, Any] = {
        str(name): bunch.data[:, i].astype(np.float64) for i, name in enumerate(bunch.feature_names)
    }
    columns["target"] = bunch.target
    features = Features(
        {
            **{name: Value("float64") for name in columns if name != "target"},
            "target": ClassLabel(names=[str(n) for n in bunch.target_names]),
        }
    )
    return DatasetDict({"train": Dataset.from_dict(columns, features=features)})


_EMBEDDED: dict[str, Callable[[], DatasetDict]] = {
    "digits": _digits,
    "breast-cancer": _breast_cancer,
}


# -- from raw columns to tensors --------------------------------------------------------------


def _is_number(feature: Any) -> bool:
    return isinstance(feature, Value) and (
        pa.types.is_integer(feature.pa_type)
        or pa.types.is_floating(feature.pa_type)
        or pa.types.is_boolean(feature.pa_type)
    )


def _is_array(feature: Any) -> bool:
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D):
        return True
    if isinstance(feature, datasets.List | datasets.LargeList):
        inner = feature.feature
        return _is_number(inner) or _is_array(inner)
    return False


def _input_kind(column: str, feature: Any) -> str:
    if isinstance(feature, datasets.Image):
        return "image"
    if _is_array(feature):
        return "array"
    if _is_number(feature):
        return "tabular"
    raise ValueError(
        f"input column {column!r} holds {feature!r}, which is neither an image, a numeric "
        "array nor a number; set input-key to the column that holds the inputs"
    )


def _detect_columns(config: DataConfig, features: Features) -> tuple[str, str, tuple[str, ...]]:
    """(label column, input kind, input columns) of a split, from the config or its columns."""
    columns = list(features)
    if config.label_key:
        if config.label_key not in columns:
            raise ValueError(
                f"label-key={config.label_key!r} is not a column; set label-key to one of "
                f"the columns {columns}"
            )
        label = config.label_key
    else:
        found = [c for c in LABEL_CANDIDATES if c in columns]
        if len(found) != 1:
            what = "no label column" if not found else f"several label columns {found}"
            raise ValueError(
                f"found {what} among the columns {columns}; set label-key to the column that "
                "holds the class"
            )
        label = found[0]
    if config.input_key:
        inputs = [c.strip() for c in config.input_key.split(",") if c.strip()]
        missing = [c for c in inputs if c not in columns]
        if missing or label in inputs:
            problem = f"{missing} are not columns" if missing else f"{label!r} is the label"
            raise ValueError(
                f"input-key={config.input_key!r}: {problem}; set input-key to one column or a "
                f"comma-separated list of numeric columns among {columns}"
            )
    else:
        rest = [c for c in columns if c != label]
        images = [c for c in IMAGE_CANDIDATES if c in rest]
        if len(images) == 1:
            inputs = images
        elif len(rest) == 1 or (
            rest and len(images) == 0 and all(_is_number(features[c]) for c in rest)
        ):
            inputs = rest
        else:
            raise ValueError(
                f"cannot tell which of the columns {rest} hold the inputs (label: {label!r}); "
                "set input-key to one column, or to a comma-separated list of numeric columns"
            )
    if len(inputs) == 1:
        kind = _input_kind(inputs[0], features[inputs[0]])
    else:
        kind = "tabular"
        other = [c for c in inputs if not _is_number(features[c])]
        if other:
            raise ValueError(
                f"table columns must be numbers; {other} are not ({[features[c] for c in other]})"
                "; leave them out of input-key"
            )
    return label, kind, tuple(inputs)


@dataclass(frozen=True)
class _Encoding:
    """Turns a batch of raw rows into ``{input_key: float array, label_key: class id}``."""

    kind: str
    columns: tuple[str, ...]
    label: str
    label_ids: tuple[tuple[Any, int], ...] | None
    image_mode: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_key: str

    def inputs(self, batch: dict[str, list[Any]]) -> np.ndarray:
        if self.kind == "image":
            return np.stack([self._image(img) for img in batch[self.columns[0]]])
        if self.kind == "array":
            array = np.asarray(batch[self.columns[0]], dtype=np.float32)
            return array[:, None] if array.ndim == 3 else array
        rows = np.stack(
            [np.asarray(batch[c], dtype=np.float32) for c in self.columns], axis=1
        ).astype(np.float32)
        if self.mean:
            rows = (rows - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return rows

    def _image(self, image: Any) -> np.ndarray:
        from PIL import Image

        image = image.convert(self.image_mode)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def labels(self, batch: dict[str, list[Any]]) -> list[int]:
        values = batch[self.label]
        if self.label_ids is None:
            return [int(v) for v in values]
        ids = dict(self.label_ids)
        return [ids[v] for v in values]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        return {self.input_key: self.inputs(batch), LABEL_KEY: self.labels(batch)}


def _class_ids(
    splits: Sequence[Dataset], label: str
) -> tuple[tuple[tuple[Any, int], ...] | None, tuple[str, ...]]:
    """(value -> id map, or None where values are the ids already; class names)."""
    feature = splits[0].features[label]
    if isinstance(feature, ClassLabel):
        return None, tuple(feature.names)
    if not _is_number(feature) and feature != Value("string"):
        raise ValueError(
            f"label column {label!r} holds {feature!r}; it must hold one class (a number or a "
            "name) per row; set label-key to such a column"
        )
    found = set().union(*(split.unique(label) for split in splits))
    if None in found:
        raise ValueError(f"label column {label!r} has empty values; fill or drop those rows")
    values = sorted(found)
    if isinstance(values[0], str | bool):
        return tuple((v, i) for i, v in enumerate(values)), tuple(str(v) for v in values)
    if any(not float(v).is_integer() or v < 0 for v in values):
        raise ValueError(
            f"label column {label!r} holds {values[:10]}; class ids must be whole numbers "
            "from 0; set label-key to the class column"
        )
    return None, tuple(str(i) for i in range(int(max(values)) + 1))


def _table(split: Dataset, columns: Sequence[str]) -> np.ndarray:
    data = split.select_columns(list(columns)).with_format("numpy")[:]
    return np.stack([np.asarray(data[c], dtype=np.float64) for c in columns], axis=1)


def _hold_out(train: Dataset, *, label: str, config: DataConfig) -> tuple[Dataset, Dataset]:
    """A stratified ``test-fraction`` of ``train`` as the held-out split."""
    from sklearn.model_selection import train_test_split

    labels = train.select_columns([label]).with_format("numpy")[:][label]
    try:
        keep, held = train_test_split(
            np.arange(len(train)),
            test_size=config.test_fraction,
            random_state=config.seed,
            stratify=labels,
        )
    except ValueError as err:
        raise ValueError(
            f"cannot hold out test-fraction={config.test_fraction} of {len(train)} examples "
            f"stratified by {label!r} ({err}); give the source a test split or use more data"
        ) from err
    return train.select(np.sort(keep)), train.select(np.sort(held))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars: every client would print them for each split."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


@dataclass
class _Prepared:
    """What the preprocessing learned about the data, filled in when it runs."""

    input_key: str = ""
    class_names: tuple[str, ...] = ()


class _Preprocessor:
    """``DatasetDict`` -> ``{"train", "test"}`` of float inputs and class ids.

    It runs where ``FederatedDataset`` applies its ``preprocessor`` (after the shuffle, before
    the partitioners get the splits) and on the embedded sets alike.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.prepared = _Prepared()

    def __call__(self, data: DatasetDict) -> DatasetDict:
        config = self.config
        if "train" not in data:
            raise ValueError(
                f"dataset={config.dataset!r} has no 'train' split, only {list(data)}; with "
                "data-files name it: 'train=PATH,test=PATH'"
            )
        train = data["train"]
        label, kind, columns = _detect_columns(config, train.features)
        if "test" in data:
            test = data["test"]
            lacking = [c for c in (label, *columns) if c not in test.column_names]
            if lacking:
                raise ValueError(
                    f"the test split lacks the columns {lacking} of the train split; give both "
                    "splits the same columns"
                )
        else:
            train, test = _hold_out(train, label=label, config=config)
        label_ids, class_names = _class_ids([train, test], label)
        mean: tuple[float, ...] = ()
        std: tuple[float, ...] = ()
        if kind == "tabular":
            tables = {"train": _table(train, columns), "test": _table(test, columns)}
            for split, table in tables.items():
                empty = [c for c, bad in zip(columns, np.isnan(table).any(0), strict=True) if bad]
                if empty:
                    raise ValueError(
                        f"the {split} split has empty values in the columns {empty}; fill or "
                        "drop them, or leave the columns out of input-key"
                    )
            if config.standardize:
                # Statistics of the train split only: the held-out split must not leak into
                # the features a model trains on.
                scale = tables["train"].std(axis=0)
                mean = tuple(float(m) for m in tables["train"].mean(axis=0))
                std = tuple(float(s) if s > 0 else 1.0 for s in scale)
        image_mode = ""
        if kind == "image":
            first = train[0][columns[0]]
            image_mode = "L" if first.mode in _SINGLE_CHANNEL_MODES else "RGB"
        input_key = TABULAR_KEY if kind == "tabular" else columns[0]
        if input_key == LABEL_KEY:  # an input column called "label", the class elsewhere
            input_key = "inputs"
        encoding = _Encoding(
            kind=kind,
            columns=columns,
            label=label,
            label_ids=label_ids,
            image_mode=image_mode,
            image_size=config.image_size,
            mean=mean,
            std=std,
            input_key=input_key,
        )
        shape = encoding.inputs(train[:1]).shape[1:]
        features = Features(
            {input_key: _array_feature(shape, column=columns[0]), LABEL_KEY: Value("int64")}
        )
        encoded = DatasetDict(
            {
                name: split.map(
                    encoding,
                    batched=True,
                    batch_size=256,
                    remove_columns=split.column_names,
                    features=features,
                )
                for name, split in (("train", train), ("test", test))
            }
        )
        self.prepared = _Prepared(input_key=input_key, class_names=class_names)
        return encoded


def _array_feature(shape: tuple[int, ...], *, column: str) -> Any:
    if len(shape) == 1:
        return datasets.List(Value("float32"), length=shape[0])
    if len(shape) == 3:
        return datasets.Array3D(shape=shape, dtype="float32")
    raise ValueError(
        f"input column {column!r} holds arrays of shape {shape}; the app takes vectors, "
        "H x W or C x H x W arrays"
    )


# -- the federated dataset --------------------------------------------------------------------


class FederatedData:
    """One source split among ``num_partitions`` clients; every split in tensors.

    Partitions are ``datasets.Dataset`` objects in torch format whose rows are
    ``{input_key: float tensor, label_key: int64 tensor}``; :func:`loader` batches them.
    """

    def __init__(
        self,
        *,
        config: DataConfig,
        num_partitions: int,
        partitioners: dict[str, Partitioner],
        train: Dataset,
        test: Dataset,
        prepared: _Prepared,
    ) -> None:
        self.config = config
        self.num_partitions = num_partitions
        self.input_key = prepared.input_key
        self.label_key = LABEL_KEY
        self.class_names = prepared.class_names
        self._partitioners = partitioners
        self._train = train
        self._test = test
        self._central_test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        """The number of classes (the model's outputs)."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` for images, ``(num_features,)`` for rows."""
        return tuple(self.sample_input().shape[1:])

    def _partition(self, split: str, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}; check the "
                "node's --node-config 'partition-id=... num-partitions=...'"
            )
        return self._partitioners[split].load_partition(partition_id).with_format("torch")

    def train_partition(self, partition_id: int) -> Dataset:
        """Client ``partition_id``'s share of the train split.

        Parameters
        ----------
        partition_id : int
            The client's partition, ``0 <= partition_id < num_partitions``.

        Returns
        -------
        datasets.Dataset
            Rows ``{input_key: Tensor, label_key: Tensor}``.
        """
        return self._partition("train", partition_id)

    def test_partition(self, partition_id: int) -> Dataset:
        """Client ``partition_id``'s share of the held-out split, for federated evaluation.

        It is split by the same kind of partitioner, with the same seed, as the train split (a
        pathological client is tested on the classes it trains on).

        Parameters
        ----------
        partition_id : int
            The client's partition, ``0 <= partition_id < num_partitions``.

        Returns
        -------
        datasets.Dataset
            Rows ``{input_key: Tensor, label_key: Tensor}``.
        """
        return self._partition("test", partition_id)

    def train_split(self) -> Dataset:
        """The whole train split (every partition together), in torch format."""
        return self._train.with_format("torch")

    def central_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole held-out split as (inputs, labels), for the server's central evaluation."""
        if self._central_test is None:
            data = self._test.with_format("torch")[:]
            self._central_test = (data[self.input_key], data[self.label_key])
        return self._central_test

    def sample_input(self) -> torch.Tensor:
        """Two train inputs on the CPU, shaped like a model's input batch."""
        inputs = self._train.with_format("torch")[:2][self.input_key]
        return torch.cat([inputs, inputs])[:2].clone()


def _load_dict(
    config: DataConfig, partitioners: dict[str, Partitioner]
) -> tuple[dict[str, Partitioner], Dataset, Dataset, _Prepared]:
    preprocess = _Preprocessor(config)
    if config.dataset in _EMBEDDED:
        # The same steps FederatedDataset takes: shuffle, preprocess, hand each split to its
        # partitioner.
        data = preprocess(_EMBEDDED[config.dataset]().shuffle(seed=config.seed))
        for split, partitioner in partitioners.items():
            partitioner.dataset = data[split]
        return partitioners, data["train"], data["test"], preprocess.prepared

    kwargs: dict[str, Any] = {}
    # Paths of local files may start with ~; a hub dataset's are inside its repository.
    local = config.dataset in FILE_SOURCES

    def path(value: str) -> str:
        return str(Path(value).expanduser()) if local else value

    if config.data_files:
        files = _split_files(config.data_files)
        if isinstance(files, dict):
            kwargs["data_files"] = {split: path(value) for split, value in files.items()}
        else:
            kwargs["data_files"] = path(files)
    if config.data_dir:
        kwargs["data_dir"] = path(config.data_dir)
    if config.cache_dir:
        kwargs["cache_dir"] = str(Path(config.cache_dir).expanduser())
    name = config.dataset.removeprefix(HUB_PREFIX)
    federated = FederatedDataset(
        dataset=name,
        subset=config.data_subset or None,
        partitioners=dict(partitioners),
        preprocessor=preprocess,
        shuffle=True,
        seed=config.seed,
        **kwargs,
    )
    assigned = federated.partitioners  # loads, preprocesses and assigns the splits
    return assigned, assigned["train"].dataset, assigned["test"].dataset, preprocess.prepared


@lru_cache(maxsize=8)
def load_federated(config: DataConfig, *, num_partitions: int) -> FederatedData:
    """Load ``config.dataset`` and split it among ``num_partitions`` clients.

    Cached per (config, num_partitions) in the process: every client of a simulation that
    runs in one process shares one copy.

    Parameters
    ----------
    config : DataConfig
        The source, the partitioner and how inputs are prepared.
    num_partitions : int
        The number of clients.

    Returns
    -------
    FederatedData
        Train and held-out partitions, the whole held-out split and the data's keys.
    """
    config.validate()
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be at least 1; got {num_partitions}")
    partitioners = {
        split: make_partitioner(config, num_partitions=num_partitions, partition_by=LABEL_KEY)
        for split in ("train", "test")
    }
    with _quiet():
        assigned, train, test, prepared = _load_dict(config, partitioners)
    for split, partitioner in assigned.items():
        rows = partitioner.dataset.num_rows
        if num_partitions > rows:
            raise ValueError(
                f"num-partitions={num_partitions} is more than the {rows} examples of the "
                f"{split} split; use fewer partitions"
                + (" or a larger test-fraction" if split == "test" else "")
            )
        try:
            _ = partitioner.num_partitions  # computes the partitions now, to fail early
        except ValueError as err:
            raise ValueError(
                f"partitioner={config.partitioner!r} cannot split the {split} split ({rows} "
                f"examples) into {num_partitions} partitions: {err} Use fewer partitions, "
                "another partitioner, or (dirichlet) a larger dirichlet-alpha"
            ) from err
    return FederatedData(
        config=config,
        num_partitions=num_partitions,
        partitioners=assigned,
        train=train,
        test=test,
        prepared=prepared,
    )


# -- batches ----------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Columns of tensors, indexed a whole batch of rows at a time."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {key: column[rows] for key, column in self.columns.items()}


def loader(
    dataset: Dataset, *, batch_size: int, shuffle_seed: int | None = None
) -> DataLoader[dict[str, torch.Tensor]]:
    """Batches of a partition as dicts ``{input_key: Tensor, label_key: Tensor}``.

    The partition is read into tensors once; each batch is then one indexing of them.

    Parameters
    ----------
    dataset : datasets.Dataset
        A partition or split of :class:`FederatedData` (numeric columns only).
    batch_size : int
        Rows per batch; the last batch may be smaller.
    shuffle_seed : int or None
        Seed of the batch order; ``None`` keeps the dataset's order. (default: None)

    Returns
    -------
    torch.utils.data.DataLoader
        Yields dict batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch-size must be at least 1; got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; a client needs at least one example")
    columns = dataset.with_format("torch")[:]
    other = [key for key, value in columns.items() if not isinstance(value, torch.Tensor)]
    if other:
        raise ValueError(
            f"loader batches tensors; the columns {other} are not numeric arrays of one shape. "
            "Pass a partition of load_federated(...), whose rows are already tensors"
        )
    rows = _Rows(columns)
    order: torch.utils.data.Sampler[int]
    if shuffle_seed is None:
        order = SequentialSampler(rows)
    else:
        order = RandomSampler(rows, generator=torch.Generator().manual_seed(shuffle_seed))
    # batch_size=None: the sampler already yields whole batches of row indices.
    return DataLoader(
        rows, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None
    )


# -- a synthetic image folder -----------------------------------------------------------------


def write_image_folder(
    root: Path,
    *,
    classes: int = 3,
    per_class: int = 30,
    test_per_class: int | None = None,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a small, learnable RGB image set in the ``imagefolder`` layout.

    Each class has its own colour and stripe direction; every image gets its own brightness,
    stripe phase and pixel noise. Files go to ``root/train/class_XX/NNNN.png`` and
    ``root/test/class_XX/NNNN.png``.

    Parameters
    ----------
    root : Path
        The folder to write to (created if missing); use it as ``data-dir``.
    classes : int
        Number of classes, 2 to 12. (default: 3)
    per_class : int
        Train images per class. (default: 30)
    test_per_class : int or None
        Test images per class; ``None`` for a third of ``per_class``, at least 2.
        (default: None)
    size : int
        Side of the square images, in pixels. (default: 32)
    seed : int
        Seed of the noise. (default: 0)

    Returns
    -------
    Path
        ``root``.
    """
    from PIL import Image

    if not 2 <= classes <= 12 or per_class < 1 or size < 4:
        raise ValueError(
            f"write_image_folder needs 2 <= classes <= 12, per_class >= 1 and size >= 4; got "
            f"classes={classes}, per_class={per_class}, size={size}"
        )
    if test_per_class is None:
        test_per_class = max(2, per_class // 3)
    rng = np.random.default_rng(seed)
    root = Path(root)
    grid = np.arange(size, dtype=np.float32)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    directions = [rows, cols, rows + cols, rows - cols]
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # Colours spread around the hue circle; stripe directions cycle through four.
            hue = label / classes
            colour = np.array([_hue_channel(hue + shift) for shift in (0.0, 2 / 3, 1 / 3)])
            direction = directions[label % len(directions)]
            for i in range(count):
                phase = rng.uniform(0, 2 * np.pi)
                stripes = 0.5 + 0.5 * np.sin(direction * (2 * np.pi / 6) + phase)
                brightness = rng.uniform(0.6, 1.0)
                image = brightness * colour[None, None, :] * (0.4 + 0.6 * stripes[:, :, None])
                image = image + rng.normal(0.0, 0.08, size=image.shape)
                pixels = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{i:04d}.png")
    return root


def _hue_channel(hue: float) -> float:
    """One RGB channel of a saturated colour: a triangle wave over the hue circle."""
    distance = abs((hue % 1.0) * 6.0 - 3.0)
    return float(np.clip(distance - 1.0, 0.0, 1.0))
