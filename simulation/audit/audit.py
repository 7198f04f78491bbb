"""Privacy audit of split learning on the embedded digits: what the split server can learn.

``python -m simulation.audit`` trains the digits CNN through the real split server on loopback
(one client holding half of the training digits; SFLV2, which with one client is centralized
training) for every cut and defense asked for, then attacks what crossed the data plane:

- **inputs**: a decoder trained on *auxiliary* digits (the other half of the training set, which
  the client never sees) maps smashed data back to images. The attacker is strong: it knows the
  trained client half (the aggregator receives it) and the defense, so it trains the decoder on
  defended activations of its own digits. Reconstructions of the client's private digits are
  scored with MSE, PSNR and SSIM, next to the floor (predicting the mean auxiliary digit);
- **distance correlation** (bias-corrected) of private inputs and smashed data: a diagnostic
  only, it bounds nothing;
- **labels** (label-private split): the norm attack (per class, the AUC of the gradient norm
  for "this example has that class", the better of the two directions, averaged over classes)
  and the cosine attack (the AUC of the cosine of two gradients of a batch for "same label")
  on the gradients the server receives in the last epoch.

Each figure comes with the test accuracy of the model that produced it. Writes ``audit.json``,
``reconstructions.png`` and ``tradeoff.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splitfed import (
    GrpcDataPlane,
    OptimizerConfig,
    PrivacyConfig,
    SplitModel,
    SplitServer,
    make_trainer,
    run_local_epochs,
    split_model,
)
from splitfed.privacy import distance_correlation

from ..app.config import AppConfig
from ..app.models import digits_cnn
from ..app.task import federated_data

__all__ = [
    "AuditRun",
    "Defense",
    "cosine_attack_auc",
    "main",
    "norm_attack_auc",
    "reconstruction_metrics",
]

OPTIMIZER = OptimizerConfig(torch.optim.SGD, lr=0.05, momentum=0.9)
CLIP_NORM = 1.0
"""The clip norm of the smashed-data noise defense; the noise is ``sigma * CLIP_NORM``."""


# -- metrics --------------------------------------------------------------------------------------


def reconstruction_metrics(originals: np.ndarray, reconstructions: np.ndarray) -> dict[str, float]:
    """Mean MSE, PSNR (dB, data range 1, capped at 100) and SSIM of image pairs.

    Both arrays are ``(N, H, W)`` with values in [0, 1].
    """
    from skimage.metrics import structural_similarity

    originals = np.asarray(originals, dtype=np.float64)
    reconstructions = np.clip(np.asarray(reconstructions, dtype=np.float64), 0.0, 1.0)
    mse = ((originals - reconstructions) ** 2).mean(axis=(1, 2))
    psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-10)), 100.0)
    ssim = [
        structural_similarity(a, b, data_range=1.0)
        for a, b in zip(originals, reconstructions, strict=True)
    ]
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(np.mean(ssim))}


def norm_attack_auc(gradients: torch.Tensor, labels: torch.Tensor) -> float:
    """The norm attack: for each class, how well the gradient norm tells that class from the
    rest (ROC AUC, the better direction), averaged over the classes present."""
    from sklearn.metrics import roc_auc_score

    norms = gradients.flatten(1).norm(dim=1).numpy()
    labels = labels.numpy()
    scores = []
    for label in np.unique(labels):
        positive = labels == label
        if positive.all():
            continue
        auc = roc_auc_score(positive, norms)
        scores.append(max(auc, 1 - auc))
    return float(np.mean(scores)) if scores else 0.5


def cosine_attack_auc(
    gradients: torch.Tensor, labels: torch.Tensor, batch_ids: torch.Tensor
) -> float:
    """The cosine attack: how well the cosine of two gradients of the same batch tells whether
    their examples share a label (ROC AUC over all pairs within batches)."""
    from sklearn.metrics import roc_auc_score

    flat = nn.functional.normalize(gradients.flatten(1).double(), dim=1)
    scores, same = [], []
    for batch in torch.unique(batch_ids):
        rows = (batch_ids == batch).nonzero().flatten()
        if len(rows) < 2:
            continue
        cosines = flat[rows] @ flat[rows].T
        upper = torch.triu_indices(len(rows), len(rows), offset=1)
        scores.append(cosines[upper[0], upper[1]])
        batch_labels = labels[rows]
        same.append(batch_labels[upper[0]] == batch_labels[upper[1]])
    scores_all, same_all = torch.cat(scores).numpy(), torch.cat(same).numpy()
    if same_all.all() or not same_all.any():
        return 0.5
    return float(roc_auc_score(same_all, scores_all))


# -- what is audited ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defense:
    """One defense setting, written ``name`` or ``name:value`` on the command line."""

    name: str = "none"
    value: float = 0.0
    extra: float = 0.0

    KINDS = ("none", "clip", "noise", "nopeek", "label-noise", "dp")

    @classmethod
    def parse(cls, text: str) -> Defense:
        name, *values = text.split(":")
        if name not in cls.KINDS or len(values) > 2:
            raise argparse.ArgumentTypeError(
                f"defense {text!r}: use none, clip:C, noise:SIGMA, nopeek:WEIGHT, "
                "label-noise:MULTIPLIER or dp:NOISE:CLIP"
            )
        numbers = [float(v) for v in values] + [0.0, 0.0]
        return cls(name, numbers[0], numbers[1])

    @property
    def label_private(self) -> bool:
        return self.name == "label-noise"

    def privacy(self) -> PrivacyConfig:
        if self.name == "clip":
            return PrivacyConfig(smashed_clip_norm=self.value)
        if self.name == "noise":
            return PrivacyConfig(smashed_clip_norm=CLIP_NORM, smashed_noise_multiplier=self.value)
        if self.name == "nopeek":
            return PrivacyConfig(nopeek_weight=self.value)
        if self.name == "label-noise":
            return PrivacyConfig(label_noise_multiplier=self.value)
        if self.name == "dp":
            return PrivacyConfig(dp_noise_multiplier=self.value, dp_max_grad_norm=self.extra)
        return PrivacyConfig()

    def __str__(self) -> str:
        if self.name == "none":
            return "none"
        if self.name == "dp":
            return f"dp:{self.value:g}:{self.extra:g}"
        return f"{self.name}:{self.value:g}"


@dataclass
class AuditRun:
    """The figures of one (cut, defense, seed)."""

    cut: str
    defense: str
    label_private: bool
    seed: int
    test_accuracy: float
    mse: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    dcor: float | None = None
    norm_auc: float | None = None
    cosine_auc: float | None = None
    smashed_epsilon_per_release: float | None = None
    smashed_epsilon: float | None = None
    dp_epsilon: float | None = None
    seconds: float = 0.0


class _Recorder:
    """Between the training loop and the data plane: keeps what the server receives."""

    def __init__(self, plane: GrpcDataPlane) -> None:
        self.plane = plane
        self.output_gradients: list[torch.Tensor] = []

    def exchange(self, step, activations, labels):
        return self.plane.exchange(step, activations, labels)

    def forward_server_half(self, step, activations):
        return self.plane.forward_server_half(step, activations)

    def backward_server_half(self, step, output_gradient):
        self.output_gradients.append(output_gradient.detach().clone())
        return self.plane.backward_server_half(step, output_gradient)

    def close(self) -> None:
        self.plane.close()


class _LabelLog:
    """An iterable of batches that remembers the labels it handed out, in order."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch_size = loader.batch_size
        self.labels: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            self.labels.append(labels.clone())
            yield images, labels


@dataclass(frozen=True)
class _Digits:
    """The app's digits as tensors: the train split, the held-out split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits() -> _Digits:
    data = federated_data(AppConfig())
    train = data.train_split()[:]
    return _Digits(train["image"], train["label"], *data.central_test())


def digits_split(*, cut: str, server_cut: str | None = None) -> SplitModel:
    return split_model(
        digits_cnn(), cut=cut, server_cut=server_cut, sample_input=torch.zeros(2, 1, 8, 8)
    )


def _train(split, defense: Defense, images, labels, *, epochs: int, seed: int):
    """Train through the real split server on loopback; return what the server received."""
    label_private = defense.label_private
    privacy = defense.privacy()
    privacy.validate(label_private=label_private, client_half=split.client_half)
    trainer = make_trainer("v2", server_half=split.server_half, optimizer=OPTIMIZER)
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        activation_dtype=split.activation_dtype,
        insecure=True,  # loopback, in this process
        label_private=label_private,
        output_shape=split.output_shape,
    )
    loader = _LabelLog(
        DataLoader(
            TensorDataset(images, labels),
            batch_size=16,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    optimizer = OPTIMIZER.build(split.client_parameters())
    with server:
        tokens = server.open_round(1, [1])
        with (
            GrpcDataPlane(
                address=server.address, node_id=1, server_round=1, token=tokens[1]
            ) as plane,
            privacy.training(split, optimizer, batch_size=loader.batch_size) as (
                trained,
                step_optimizer,
            ),
        ):
            recorder = _Recorder(plane)
            run_local_epochs(
                split=trained,
                data_plane=recorder,
                train_loader=loader,
                optimizer=step_optimizer,
                local_epochs=epochs,
                privacy=privacy,
                generator=torch.Generator().manual_seed(seed + 1),
            )
        server.close_round()
    return privacy, recorder, loader


def _smashed(split, privacy: PrivacyConfig, images: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return privacy.protect_smashed(
            split.client_half(images), generator=torch.Generator().manual_seed(seed)
        )


def _accuracy(split, privacy: PrivacyConfig, images, labels, *, label_private: bool) -> float:
    split.full_model().eval()
    with torch.no_grad():
        outputs = split.server_half(_smashed(split, privacy, images, seed=12345))
        if label_private:
            outputs = split.client_head(outputs)
    return float((outputs.argmax(dim=1) == labels).float().mean())


def _decoder_attack(
    split, privacy, aux_images, private_images, *, epochs: int, seed: int
) -> torch.Tensor:
    """Train a decoder on the attacker's own digits; return reconstructions of the private."""
    torch.manual_seed(seed)
    aux_smashed = _smashed(split, privacy, aux_images, seed=seed + 2)
    private_smashed = _smashed(split, privacy, private_images, seed=seed + 3)
    width = aux_smashed[0].numel()
    decoder = nn.Sequential(
        nn.Flatten(), nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.Sigmoid()
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    targets = aux_images.flatten(1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(aux_images), generator=generator)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            loss = nn.functional.mse_loss(decoder(aux_smashed[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return decoder(private_smashed).view(-1, 8, 8)


def audit_one(
    cut: str,
    defense: Defense,
    seed: int,
    *,
    epochs: int,
    decoder_epochs: int,
    attack_examples: int,
) -> tuple[AuditRun, np.ndarray | None]:
    """Train one configuration and attack it; return its figures and some reconstructions."""
    started = time.perf_counter()
    data = load_digits()
    generator = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(data.train_labels), generator=generator)
    private, aux = order[: len(order) // 2], order[len(order) // 2 :]
    images, labels = data.train_images[private], data.train_labels[private]
    torch.manual_seed(seed)
    if defense.label_private:
        split = digits_split(cut=cut, server_cut="relu3")
    else:
        split = digits_split(cut=cut)
    privacy, recorder, loader = _train(split, defense, images, labels, epochs=epochs, seed=seed)
    run = AuditRun(
        cut=cut,
        defense=str(defense),
        label_private=defense.label_private,
        seed=seed,
        test_accuracy=_accuracy(
            split,
            privacy,
            data.test_images,
            data.test_labels,
            label_private=defense.label_private,
        ),
    )
    epsilons = privacy.epsilons(releases=epochs, dp_steps=epochs)
    run.smashed_epsilon_per_release = epsilons.get("smashed-epsilon-per-release")
    run.smashed_epsilon = epsilons.get("smashed-epsilon")
    run.dp_epsilon = epsilons.get("dp-epsilon")
    split.client_half.eval()
    attacked = images[:attack_examples]
    with torch.no_grad():
        run.dcor = float(
            distance_correlation(attacked[:256], _smashed(split, privacy, attacked[:256], seed))
        )
    reconstructions = _decoder_attack(
        split, privacy, data.train_images[aux], attacked, epochs=decoder_epochs, seed=seed
    )
    scores = reconstruction_metrics(attacked[:, 0].numpy(), reconstructions.numpy())
    run.mse, run.psnr, run.ssim = scores["mse"], scores["psnr"], scores["ssim"]
    if defense.label_private:
        last_epoch = len(recorder.output_gradients) // epochs
        gradients = recorder.output_gradients[-last_epoch:]
        batch_labels = loader.labels[-last_epoch:]
        flat_gradients = torch.cat(gradients)
        flat_labels = torch.cat(batch_labels)
        batch_ids = torch.cat([torch.full((len(b),), i) for i, b in enumerate(batch_labels)])
        run.norm_auc = norm_attack_auc(flat_gradients, flat_labels)
        run.cosine_auc = cosine_attack_auc(flat_gradients, flat_labels, batch_ids)
    run.seconds = time.perf_counter() - started
    return run, reconstructions[:10].numpy()


def floor_metrics(attack_examples: int, seed: int) -> dict[str, float]:
    """Reconstructing every private digit as the mean auxiliary digit."""
    data = load_digits()
    order = torch.randperm(
        len(data.train_labels), generator=torch.Generator().manual_seed(1000 + seed)
    )
    private, aux = order[: len(order) // 2], order[len(order) // 2 :]
    originals = data.train_images[private][:attack_examples, 0].numpy()
    mean = data.train_images[aux][:, 0].mean(dim=0).numpy()
    return reconstruction_metrics(originals, np.broadcast_to(mean, originals.shape))


# -- report ---------------------------------------------------------------------------------------


def summarize(runs: list[AuditRun], floor: dict[str, float]) -> dict:
    """Mean and standard deviation over seeds per (cut, defense), and the goals."""
    groups: dict[tuple[str, str], list[AuditRun]] = {}
    for run in runs:
        groups.setdefault((run.cut, run.defense), []).append(run)
    summary = []
    for (cut, defense), members in groups.items():
        row: dict = {"cut": cut, "defense": defense, "label_private": members[0].label_private}
        row["seeds"] = len(members)
        for key in (
            "test_accuracy",
            "mse",
            "psnr",
            "ssim",
            "dcor",
            "norm_auc",
            "cosine_auc",
            "smashed_epsilon_per_release",
            "smashed_epsilon",
            "dp_epsilon",
        ):
            values = [getattr(m, key) for m in members if getattr(m, key) is not None]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)

    def baseline(cut: str, label_private: bool) -> dict | None:
        return next(
            (
                r
                for r in summary
                if r["cut"] == cut
                and r["label_private"] == label_private
                and r["defense"] in ("none", "label-noise:0")
            ),
            None,
        )

    goals = {"reconstruction": [], "labels": []}
    for row in summary:
        base = baseline(row["cut"], row["label_private"])
        if base is None or row is base:
            continue
        drop = base["test_accuracy"] - row["test_accuracy"]
        if not row["label_private"]:
            goals["reconstruction"].append(
                {
                    "cut": row["cut"],
                    "defense": row["defense"],
                    "ssim_over_floor": row["ssim"] - floor["ssim"],
                    "accuracy_drop": drop,
                    "met": bool(row["ssim"] <= floor["ssim"] + 0.1 and drop <= 0.02),
                }
            )
        else:
            goals["labels"].append(
                {
                    "cut": row["cut"],
                    "defense": row["defense"],
                    "norm_auc": row["norm_auc"],
                    "cosine_auc": row["cosine_auc"],
                    "accuracy_drop": drop,
                    "met": bool(
                        row["norm_auc"] <= 0.6 and row["cosine_auc"] <= 0.6 and drop <= 0.01
                    ),
                }
            )
    return {"summary": summary, "goals": goals}


def plot(
    path_reconstructions: Path,
    path_tradeoff: Path,
    originals: np.ndarray,
    reconstructions: dict[str, np.ndarray],
    summary: list[dict],
    floor: dict[str, float],
) -> None:
    """Originals above each configuration's reconstructions; accuracy against leakage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["original", *reconstructions]
    figure, axes = plt.subplots(
        len(rows), 10, figsize=(10, 1.05 * len(rows)), squeeze=False, layout="constrained"
    )
    for r, name in enumerate(rows):
        images = originals if name == "original" else reconstructions[name]
        for c in range(10):
            axis = axes[r][c]
            axis.imshow(images[c], cmap="gray_r", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("Private digits (top) and the decoder attack's reconstructions")
    figure.savefig(path_reconstructions, dpi=110)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for cut in sorted({r["cut"] for r in summary if not r["label_private"]}):
        members = [r for r in summary if r["cut"] == cut and not r["label_private"]]
        members.sort(key=lambda r: r["ssim"])
        left.errorbar(
            [r["ssim"] for r in members],
            [r["test_accuracy"] for r in members],
            xerr=[r["ssim_std"] for r in members],
            yerr=[r["test_accuracy_std"] for r in members],
            marker="o",
            label=f"cut after {cut}",
        )
        for r in members:
            left.annotate(r["defense"], (r["ssim"], r["test_accuracy"]), fontsize=7)
    left.axvline(floor["ssim"], color="grey", linestyle="--", label="floor (mean image)")
    left.axvline(floor["ssim"] + 0.1, color="grey", linestyle=":", label="goal: floor + 0.1")
    left.set_xlabel("decoder attack SSIM (lower leaks less)")
    left.set_ylabel("test accuracy")
    left.set_title("Inputs: accuracy against reconstruction")
    left.legend(fontsize=7)
    members = sorted((r for r in summary if r["label_private"]), key=lambda r: r["cosine_auc"])
    if members:
        for key, marker in (("cosine_auc", "o"), ("norm_auc", "s")):
            right.plot(
                [r[key] for r in members],
                [r["test_accuracy"] for r in members],
                marker=marker,
                label=key.replace("_auc", " attack"),
            )
        for r in members:
            right.annotate(r["defense"], (r["cosine_auc"], r["test_accuracy"]), fontsize=7)
        right.axvline(0.6, color="grey", linestyle=":", label="goal: AUC 0.6")
    right.set_xlabel("label attack AUC (0.5 = guessing)")
    right.set_ylabel("test accuracy")
    right.set_title("Labels (label-private split)")
    right.legend(fontsize=7)
    figure.savefig(path_tradeoff, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.audit",
        description="Attack what the split server sees on the digits task, per cut and defense.",
    )
    parser.add_argument("--cuts", default="relu1,pool", help="cut layers (default: relu1,pool)")
    parser.add_argument(
        "--defenses",
        default="none,clip:1,noise:0.02,noise:0.05,noise:0.1,noise:0.2,nopeek:2",
        help="plain-split defenses: none, clip:C, noise:SIGMA (clip norm 1), nopeek:WEIGHT, "
        "dp:NOISE:CLIP",
    )
    parser.add_argument(
        "--label-defenses",
        default="label-noise:0,label-noise:0.25,label-noise:0.5,label-noise:1",
        help="label-private split (cut at pool, server to relu3): label-noise:MULTIPLIER",
    )
    parser.add_argument("--seeds", default="0,1,2", help="seeds (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    parser.add_argument("--decoder-epochs", type=int, default=60)
    parser.add_argument("--attack-examples", type=int, default=300)
    parser.add_argument("--out", default="outputs/audit", help="folder for the report and plots")
    parser.add_argument(
        "--quick", action="store_true", help="one seed, few configurations and epochs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.cuts, args.defenses, args.label_defenses = (
            "pool",
            "none,noise:0.1",
            "label-noise:0,label-noise:1",
        )
        args.seeds, args.epochs, args.decoder_epochs, args.attack_examples = "0", 2, 5, 100
    logging.getLogger("flwr_splitfed").setLevel(logging.ERROR)  # loopback, warnings known
    # Small models: one thread is fastest, and much faster on a busy machine.
    torch.set_num_threads(1)
    cuts = [c for c in args.cuts.split(",") if c]
    defenses = [Defense.parse(d) for d in args.defenses.split(",") if d]
    label_defenses = [Defense.parse(d) for d in args.label_defenses.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = [(cut, d) for cut in cuts for d in defenses] + [("pool", d) for d in label_defenses]

    runs: list[AuditRun] = []
    shown: dict[str, np.ndarray] = {}
    for seed in seeds:
        for cut, defense in settings:
            run, reconstructions = audit_one(
                cut,
                defense,
                seed,
                epochs=args.epochs,
                decoder_epochs=args.decoder_epochs,
                attack_examples=args.attack_examples,
            )
            runs.append(run)
            if seed == seeds[0] and not defense.label_private:
                shown[f"{cut} {defense}"] = reconstructions
            print(
                f"seed {seed} cut {cut:6s} {str(defense):15s} acc {run.test_accuracy:.4f} "
                f"ssim {run.ssim:.3f} psnr {run.psnr:5.2f} dcor {run.dcor:.3f}"
                + (
                    f" norm-auc {run.norm_auc:.3f} cos-auc {run.cosine_auc:.3f}"
                    if run.label_private
                    else ""
                )
                + f" ({run.seconds:.1f} s)",
                flush=True,
            )
    floor = floor_metrics(args.attack_examples, seeds[0])
    report = {
        "command": "python -m simulation.audit " + " ".join(argv or []),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "clip_norm": CLIP_NORM,
        "floor": floor,
        **summarize(runs, floor),
        "runs": [asdict(run) for run in runs],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2, default=_json_number))
    data = load_digits()
    order = torch.randperm(
        len(data.train_labels), generator=torch.Generator().manual_seed(1000 + seeds[0])
    )
    originals = data.train_images[order[:10], 0].numpy()
    plot(
        out / "reconstructions.png",
        out / "tradeoff.png",
        originals,
        shown,
        report["summary"],
        floor,
    )
    print(f"floor (mean auxiliary digit): ssim {floor['ssim']:.3f} psnr {floor['psnr']:.2f}")
    for kind, rows in report["goals"].items():
        for row in rows:
            print(f"goal {kind}: {row}")
    print(f"wrote {out / 'audit.json'}, {out / 'reconstructions.png'}, {out / 'tradeoff.png'}")
    return report


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    main()
