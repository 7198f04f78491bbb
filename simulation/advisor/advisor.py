"""Which cut layer: what each cut of a model costs the client, what it trains to, and what the
split server can reconstruct from it.

``python -m simulation.advisor`` lists every valid cut of the digits CNN (or ``--cuts``) and, per
cut, the client's parameters and share of the model, its FLOPs per training sample (forward and
backward), its memory for a training step, and the data-plane bytes per training sample, from
:func:`splitfed.advisor.cut_costs`; beside them, after a short run through the real split server
(the privacy audit's :func:`~simulation.audit.audit.train_configuration`), the test accuracy and
the audit's decoder attack on the activations (:func:`~simulation.audit.audit.attack`: SSIM,
judge accuracy, re-identification), against the audit's floors. A last row puts the whole model
on the client (plain FedAvg), trained on the same digits with the same optimizer, batches and
epochs. Writes ``advisor.json`` and ``cut-layer.png`` to ``--out``.

The audit trains and attacks the digits CNN only, so ``--model resnet`` or ``--model mlp`` (the
app's other models, on 8x8 digits) gives the costs alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from splitfed import CutError
from splitfed.advisor import WHOLE_MODEL, CutCost, cut_costs
from splitfed.privacy import ClientSecret

from ..app.models import MODELS, build_model, digits_cnn
from ..app.task import evaluate_model
from ..audit.audit import (
    OPTIMIZER,
    AuditRun,
    Defense,
    attack,
    floor_metrics,
    load_digits,
    private_and_auxiliary,
    train_configuration,
)

__all__ = ["BATCH_SIZE", "OPTIMIZER_STATES", "main", "plot", "table", "train_whole_model"]

BATCH_SIZE = 16
"""The audit's training batch size, for which the client's memory is counted."""
OPTIMIZER_STATES = 1
"""The audit's optimizer is SGD with momentum: one state tensor per parameter."""
SAMPLE_INPUT_SHAPE = (2, 1, 8, 8)
"""A batch of the embedded 8x8 digits."""
_AUDITED = "cnn"
"""The model the audit trains and attacks (``digits_split``)."""
_LEAKAGE = ("ssim", "judge_accuracy", "reidentification", "dcor", "psnr", "mse")


def train_whole_model(seed: int, *, epochs: int) -> float:
    """Train the whole digits CNN on the client's digits, no split, as the audit trains a split
    (same digits, initial weights, optimizer, batch size and batch order); return the test
    accuracy."""
    data = load_digits()
    private, _ = private_and_auxiliary(seed)
    torch.manual_seed(seed)
    model = digits_cnn()
    secret = ClientSecret.from_value(f"audit-client:{seed}")
    loader = DataLoader(
        TensorDataset(data.train_images[private], data.train_labels[private]),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=secret.generator("shuffle"),
    )
    optimizer = OPTIMIZER.build(model.parameters())
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return evaluate_model(model, data.test_images, data.test_labels)[1]


def _model(name: str) -> torch.nn.Module:
    sample = torch.zeros(SAMPLE_INPUT_SHAPE)
    return (
        digits_cnn() if name == _AUDITED else build_model(name, num_classes=10, sample_input=sample)
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(runs: list[AuditRun]) -> dict[str, float]:
    row: dict[str, float] = {}
    for key in ("test_accuracy", *_LEAKAGE):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if values:
            row[key], row[f"{key}_std"] = _mean_std(values)
    return row


def _fmt_bytes(count: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f} B"


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f}±{row.get(key + '_std', 0.0):.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The advisor's rows as a fixed-width table, one line per cut."""
    header = (
        f"{'cut':12s} {'activations':>11s} {'client params':>16s} {'client MFLOPs':>16s} "
        f"{'client mem':>11s} {'B/sample':>9s} {'accuracy':>12s} {'SSIM':>12s} {'judge':>12s} "
        f"{'re-id':>12s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "x".join(map(str, row["activation_shape"] or [])) or "-"
        lines.append(
            f"{row['cut']:12s} {shape:>11s} "
            f"{row['client_parameters']:>7,d} ({row['client_share']:>6.1%}) "
            f"{row['client_flops'] / 1e6:>7.2f} ({row['client_flops_share']:>6.1%}) "
            f"{_fmt_bytes(row['client_memory_bytes']):>11s} {row['bytes_per_sample']:>9,d} "
            f"{_pm(row, 'test_accuracy'):>12s} {_pm(row, 'ssim'):>12s} "
            f"{_pm(row, 'judge_accuracy'):>12s} {_pm(row, 'reidentification'):>12s}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], floor: dict[str, float] | None, path: Path) -> Path:
    """Six panels against the cut: client parameters, FLOPs, memory and bytes per sample, then
    accuracy and leakage (with the audit's floors). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [row["cut"] for row in rows]
    x = list(range(len(rows)))
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    (params, flops, memory), (traffic, accuracy, leakage) = axes

    params.bar(x, [r["client_share"] * 100 for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        params.annotate(
            f"{r['client_parameters']:,}", (i, r["client_share"] * 100), ha="center", fontsize=7
        )
    params.set_ylabel("% of the model's parameters")
    params.set_title("Client parameters (count above the bar)")

    client = [r["client_flops"] / 1e6 for r in rows]
    server = [r["server_flops"] / 1e6 for r in rows]
    flops.bar(x, client, label="client")
    flops.bar(x, server, bottom=client, label="server", color="tab:gray", alpha=0.5)
    flops.set_ylabel("MFLOPs per training sample")
    flops.set_title("Forward + backward FLOPs per sample")
    flops.legend(fontsize=7)

    batch = rows[0]["batch_size"]
    state = [(r["client_memory_bytes"] - r["client_activation_bytes"]) / 2**10 for r in rows]
    activations = [r["client_activation_bytes"] / 2**10 for r in rows]
    memory.bar(x, state, label="parameters, gradients, optimizer state")
    memory.bar(x, activations, bottom=state, label="activations", color="tab:orange")
    memory.set_ylabel("KiB")
    memory.set_title(f"Client memory for a training step (batch {batch})")
    memory.legend(fontsize=7)

    up = [r["bytes_up_per_sample"] / 2**10 for r in rows]
    down = [r["bytes_down_per_sample"] / 2**10 for r in rows]
    traffic.bar(x, up, label="activations up")
    traffic.bar(x, down, bottom=up, label="gradient down", color="tab:green")
    traffic.set_ylabel("KiB per training sample")
    traffic.set_title("Data plane per training sample")
    traffic.legend(fontsize=7)

    measured = [(i, r) for i, r in enumerate(rows) if "test_accuracy" in r]
    if measured:
        accuracy.errorbar(
            [i for i, _ in measured],
            [r["test_accuracy"] for _, r in measured],
            yerr=[r["test_accuracy_std"] for _, r in measured],
            marker="o",
            linestyle="none",
        )
    else:
        accuracy.text(0.5, 0.5, "not trained", ha="center", transform=accuracy.transAxes)
    accuracy.set_ylabel("test accuracy (mean ± std over seeds)")
    accuracy.set_title("Accuracy after the short run")

    attacked = [(i, r) for i, r in enumerate(rows) if "ssim" in r]
    colours = {"ssim": "tab:red", "judge_accuracy": "tab:purple", "reidentification": "tab:brown"}
    for key, colour in colours.items():
        if attacked:
            leakage.errorbar(
                [i for i, _ in attacked],
                [r[key] for _, r in attacked],
                yerr=[r[f"{key}_std"] for _, r in attacked],
                marker="o",
                color=colour,
                label=key.replace("_", " "),
            )
    if floor:
        floors = (
            ("ssim", floor["class_mean_ssim"], "class-mean SSIM"),
            ("judge_accuracy", floor["class_mean_judge_accuracy"], "judge on class means"),
            ("reidentification", floor["reidentification_chance"], "re-identification chance"),
        )
        for key, value, label in floors:
            leakage.axhline(value, color=colours[key], linestyle=":", label=label)
    if not attacked:
        leakage.text(0.5, 0.5, "not attacked", ha="center", transform=leakage.transAxes)
    else:
        leakage.legend(fontsize=7)
    leakage.set_ylim(0, 1.05)
    leakage.set_title("Decoder attack on the activations (floors dotted)")

    for axis in axes.flat:
        axis.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        axis.set_xlabel("cut after (last: no cut, the whole model on the client)", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.advisor",
        description="Per cut layer: the client's parameters, FLOPs, memory and data-plane bytes, "
        "the accuracy after a short run and what the split server reconstructs.",
    )
    parser.add_argument(
        "--model",
        default=_AUDITED,
        choices=sorted(MODELS),
        help="the app's model on 8x8 digits (default: cnn, the digits CNN); only cnn is trained "
        "and attacked",
    )
    parser.add_argument("--cuts", default="", help="comma-separated cuts (default: every valid)")
    parser.add_argument(
        "--epochs", type=int, default=5, help="training epochs per cut (default: 5)"
    )
    parser.add_argument(
        "--seeds",
        "--seed",
        default="0,1,2",
        help="comma-separated seeds, figures are mean ± std over them (default: 0,1,2)",
    )
    parser.add_argument(
        "--defense",
        default="none",
        help="the plain split's defense, as in the audit: none, clip:C, noise:SIGMA, "
        "nopeek:WEIGHT or dp:NOISE:CLIP (default: none)",
    )
    parser.add_argument("--decoder-epochs", type=int, default=30, help="(default: 30)")
    parser.add_argument("--attack-examples", type=int, default=300, help="(default: 300)")
    parser.add_argument("--out", default="outputs/advisor", help="(default: outputs/advisor)")
    parser.add_argument(
        "--quick", action="store_true", help="one seed, one epoch, a small attack (seconds)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the advisor; return what it writes to ``advisor.json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.decoder_epochs, args.attack_examples = "0", 1, 3, 100
    try:
        defense = Defense.parse(args.defense)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if defense.label_private:
        parser.error(
            f"--defense {args.defense}: the advisor compares cuts of the plain split; audit the "
            "label-private split with python -m simulation.audit"
        )
    if args.epochs < 1 or args.decoder_epochs < 1 or args.attack_examples < 10:
        parser.error("--epochs and --decoder-epochs must be at least 1, --attack-examples 10")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()] or None
    library_logger = logging.getLogger("flwr_splitfed")
    saved_level, threads = library_logger.level, torch.get_num_threads()
    library_logger.setLevel(logging.ERROR)  # loopback, warnings known
    torch.set_num_threads(1)  # small models: one thread is fastest, and kind to a busy machine
    try:
        return _run(args, argv, cuts, seeds, defense, parser)
    finally:
        library_logger.setLevel(saved_level)
        torch.set_num_threads(threads)


def _run(
    args: argparse.Namespace,
    argv: list[str] | None,
    cuts: list[str] | None,
    seeds: list[int],
    defense: Defense,
    parser: argparse.ArgumentParser,
) -> dict[str, Any]:
    started = time.perf_counter()
    model = _model(args.model)
    try:
        costs: list[CutCost] = cut_costs(
            model,
            sample_input=torch.zeros(SAMPLE_INPUT_SHAPE),
            cuts=cuts,
            batch_size=BATCH_SIZE,
            optimizer_states=OPTIMIZER_STATES,
        )
    except CutError as err:
        parser.error(f"--cuts: {err}")
    print(
        f"costs of {len(costs) - 1} cuts and the whole model "
        f"({time.perf_counter() - started:.1f} s)"
    )
    rows = [cost.as_dict() for cost in costs]
    runs: list[dict[str, Any]] = []
    audited = args.model == _AUDITED
    examples = len(private_and_auxiliary(seeds[0])[0]) if audited else None
    for row in rows:
        # What travels: the client's state to and from the aggregator each round, and the cut's
        # bytes for every training example each epoch.
        row["state_bytes_per_round"] = 2 * row["client_state_bytes"]
        if examples is not None:
            row["data_plane_bytes_per_epoch"] = row["bytes_per_sample"] * examples
    if not audited:
        print(f"--model {args.model}: costs only, the audit trains and attacks the digits CNN")
    for index, row in enumerate(rows if audited else [], start=1):
        began = time.perf_counter()
        if row["cut"] == WHOLE_MODEL:
            # No activations cross: nothing to attack per batch, and no smashed-data defense.
            accuracies = [train_whole_model(seed, epochs=args.epochs) for seed in seeds]
            row["test_accuracy"], row["test_accuracy_std"] = _mean_std(accuracies)
            row["defense"] = "none"
            runs += [
                {"cut": WHOLE_MODEL, "seed": s, "test_accuracy": a}
                for s, a in zip(seeds, accuracies, strict=True)
            ]
        else:
            audits = []
            for seed in seeds:
                trained = train_configuration(row["cut"], defense, seed, epochs=args.epochs)
                audit, _ = attack(
                    trained,
                    decoder_epochs=args.decoder_epochs,
                    attack_examples=args.attack_examples,
                )
                audits.append(audit)
            row.update(_summarise(audits))
            row["defense"] = str(defense)
            runs += [asdict(a) for a in audits]
        row["seconds"] = time.perf_counter() - began
        leak = (
            f" ssim {_pm(row, 'ssim')} judge {_pm(row, 'judge_accuracy')} "
            f"re-id {_pm(row, 'reidentification')}"
            if "ssim" in row
            else ""
        )
        print(
            f"[{index}/{len(rows)}] {row['cut']:12s} accuracy {_pm(row, 'test_accuracy')}{leak} "
            f"({row['seconds']:.1f} s, {time.perf_counter() - started:.0f} s elapsed)",
            flush=True,
        )
    floor = floor_metrics(args.attack_examples, seeds[0]) if audited else None
    report: dict[str, Any] = {
        "command": " ".join(["python -m simulation.advisor", *(argv or [])]),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "quick")},
            "quick": args.quick,
            "client_examples": examples,
            "sample_input_shape": list(SAMPLE_INPUT_SHAPE),
            "batch_size": BATCH_SIZE,
            "optimizer": "SGD(lr=0.05, momentum=0.9)",
            "optimizer_states": OPTIMIZER_STATES,
        },
        "floor": floor,
        "rows": rows,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table(rows))
    if floor:
        print(
            f"floors: class-mean digit SSIM {floor['class_mean_ssim']:.3f}, judge "
            f"{floor['class_mean_judge_accuracy']:.3f}; re-identification chance "
            f"{floor['reidentification_chance']:.3f}; mean digit SSIM {floor['ssim']:.3f}"
        )
    picture = plot(rows, floor, out / "cut-layer.png")
    report["wall_seconds"] = time.perf_counter() - started
    (out / "advisor.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'advisor.json'} and {picture} ({report['wall_seconds']:.0f} s)")
    return report
