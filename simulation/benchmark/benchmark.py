"""How fast SplitFed is, against baselines run in the same process on the same data:
``python -m simulation.benchmark``.

Every figure is the minimum of ``--repeats`` repetitions, shown as ``min (median, spread%)`` with
the machine's load while it ran; a figure whose repeats spread more than the noise bound is marked
``noisy`` (and so is a ratio built from one). The two sides of a comparison are interleaved, so
that a busy spell slows both.

- **step**: one client's training step through the split server (SFLV1, client and server in
  processes of their own, one torch thread each, gRPC on loopback) against the same step of the
  unsplit model in the client's process: what the data plane adds to a step.
- **overhead**: a steady SplitFed round of several clients (each in its own process) against
  training the unsplit model on the same samples in one process, with one torch thread and with
  all cores (the baseline is the faster; both are shown so that a slowed baseline shows). With
  ``c`` cores the limit is ``1/c``.
- **messages**: the same step driven by one Flower message per batch through Flower's
  simulation engine, against the data plane.
- **rounds**: the app's round under ``flwr run`` (SFLV1, SFLV2) against the same rounds in one
  process with clients one after another (as the original SplitFed scripts train) and against
  Flower's FedAvg of the unsplit model on the same engine, data and clients, for several numbers
  of clients; drawn in ``round_time.png``.
- **bytes** and **cost**: what a batch puts on the wire per compression, model sync, and the
  client half's parameters, FLOPs and training memory next to the full model's (exact counts).
- **scaling**: the SFLV1 split server's throughput with 1 to 16 clients that only send.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from splitfed import cut_costs
from splitfed.wire import COMPRESSIONS

from .measure import (
    frame_bytes,
    measure_overhead,
    measure_scaling,
    measure_step,
    message_per_batch,
    state_bytes,
)
from .models import WORKLOADS, synthetic_partition
from .network import run_network
from .stats import NOISE_BOUND, Repeated, machine, ratio

__all__ = ["SECTIONS", "main"]

SECTIONS = (
    "step",
    "overhead",
    "messages",
    "rounds",
    "monitor",
    "bytes",
    "cost",
    "network",
    "accuracy",
    "scaling",
)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


class Report:
    """Markdown for the console and ``results.md``; figures for ``results.json``."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.lines: list[str] = []
        self.figures: dict[str, Any] = {}

    def say(self, text: str = "") -> None:
        self.out(text)
        self.lines.append(text)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.say(f"\n{title}\n")
        self.say(_table(headers, rows))


def _app_server_threads(variant: str) -> int:
    """Torch threads of the split server as the app sets them (see simulation/app)."""
    return 1 if variant == "v1" else os.cpu_count() or 1


def run_step(report: Report, *, quick: bool, repeats: int) -> None:
    steps = 40 if quick else 400
    result = measure_step(WORKLOADS["W1"], steps=steps, repeats=repeats)
    report.figures["step"] = {
        "split": result.split.as_dict(),
        "unsplit": result.unsplit.as_dict(),
        "added": result.added,
    }
    report.table(
        f"Data-plane step: W1 (LeNet-5 cut after its first block, batch 32), one client, "
        f"{steps} steps a repeat; ms per step, min (median, spread)",
        ["through the split server", "unsplit, same process", "added by the data plane", "load"],
        [
            [
                result.split.show(1e3, 3),
                result.unsplit.show(1e3, 3),
                f"**{1e3 * result.added:.3f}**"
                + (" noisy" if result.split.noisy or result.unsplit.noisy else ""),
                f"{max(result.split.load, result.unsplit.load):.2f}",
            ]
        ],
    )


def run_overhead(
    report: Report, *, quick: bool, repeats: int, workloads: Sequence[str], variants: Sequence[str]
) -> None:
    cores = os.cpu_count() or 1
    rows = []
    report.figures["overhead"] = []
    for name in workloads:
        workload = WORKLOADS[name]
        samples = workload.quick_samples_per_client if quick else workload.samples_per_client
        clients = min(workload.num_clients, 4) if quick else workload.num_clients
        for variant in variants:
            result = measure_overhead(
                workload,
                variant=variant,
                samples=samples,
                num_clients=clients,
                repeats=repeats,
                server_threads=_app_server_threads(variant),
            )
            report.figures["overhead"].append(
                {
                    "workload": name,
                    "variant": variant,
                    "clients": clients,
                    "samples": samples,
                    "split": result.split.as_dict(),
                    "unsplit": {t: r.as_dict() for t, r in result.unsplit.items()},
                    "ratio": result.ratio,
                    "noisy": result.noisy,
                }
            )
            rows.append(
                [
                    f"{name} SFL{variant.upper()}",
                    f"{clients} x {samples:,}",
                    result.split.show(),
                    result.unsplit[1].show(),
                    result.unsplit[max(result.unsplit)].show(),
                    f"**{result.ratio:.2f}**" + (" noisy" if result.noisy else ""),
                    f"{1 / cores:.2f}",
                    f"{max(result.split.load, *(r.load for r in result.unsplit.values())):.2f}",
                ]
            )
            report.out(f"  measured {name} SFL{variant.upper()}")
    report.table(
        "Parallel clients: steady SplitFed round / unsplit training of the same samples, seconds "
        "min (median, spread)",
        [
            "workload",
            "clients x samples",
            "split round",
            "unsplit, 1 thread",
            f"unsplit, {cores} threads",
            "ratio",
            "limit",
            "load",
        ],
        rows,
    )
    report.say(
        "\n"
        "The unsplit baselines run in the benchmark's process while the split server is up. "
        "Where the server runs with as many torch threads as cores (SFLV2, as the app sets it), "
        "its OpenMP team and the baseline's together exceed the cores, and libgomp then stops "
        "spinning between parallel regions: every small operation pays a thread wake-up, and "
        "the multi-threaded baseline is about twice as slow (checked: with "
        "OMP_WAIT_POLICY=ACTIVE, or once the server is closed, it is not). The 1-thread "
        "baseline has no team and is not affected; ratios use it."
    )


def run_messages(report: Report, *, repeats: int) -> None:
    plane, flower = message_per_batch(WORKLOADS["W1"], steps=30, repeats=repeats)
    ratio = flower.min / plane.min
    report.figures["messages"] = {"data_plane": plane.as_dict(), "flower": flower.as_dict()}
    report.table(
        "One Flower message per batch (simulation engine) vs the data plane, W1, one client; "
        "ms per step, min (median, spread)",
        ["path", "ms per step", "ratio"],
        [
            ["data plane (gRPC stream)", plane.show(1e3, 2), "1"],
            [
                "Flower send_and_receive per batch",
                flower.show(1e3, 1),
                f"**{ratio:.0f}**" + (" noisy" if plane.noisy or flower.noisy else ""),
            ],
        ],
    )


def run_rounds(report: Report, *, quick: bool, out_dir: Path | None) -> None:
    from .rounds import app_rounds, sequential_rounds  # noqa: PLC0415

    counts = [2, 4] if quick else [2, 5, 10, 20]
    rounds = 3 if quick else 6
    series: dict[str, dict[int, Repeated]] = {}
    for clients in counts:
        at_once = min(clients, 4)
        for variant in ("v1", "v2", "fedavg"):
            label = {"v1": "SFLV1", "v2": "SFLV2", "fedavg": "FedAvg (unsplit)"}[variant]
            series.setdefault(label, {})[clients] = app_rounds(
                variant, num_clients=clients, rounds=rounds, clients_at_once=at_once
            )
        for variant in ("v1", "v2"):
            label = f"SFL{variant.upper()} in one process, clients in turn"
            series.setdefault(label, {})[clients] = sequential_rounds(
                variant, num_clients=clients, rounds=rounds
            )
        report.out(f"  measured rounds with {clients} clients")
    report.figures["rounds"] = {
        label: {n: r.as_dict() for n, r in values.items()} for label, values in series.items()
    }
    report.table(
        "The app's round (digits, 2 local epochs, batch 16, up to 4 ClientApps at once) under "
        f"flwr run, against the same rounds in one process and FedAvg; seconds per steady "
        f"round, min (median, spread) of {rounds - 1} rounds",
        ["clients", *series],
        [[n, *(series[label][n].show() for label in series)] for n in counts],
    )
    if out_dir is not None:
        _plot_rounds(series, out_dir / "round_time.png")
        report.say(f"\nRound time against clients: {out_dir / 'round_time.png'}")


def run_monitor(report: Report, *, quick: bool, repeats: int) -> None:
    """What the leakage monitor adds to the demo's round: the same app run with it on and off,
    alternated, in this process on the same data; in the plain split (inputs attacked) and the
    label-private split (inputs and labels)."""
    from .rounds import app_round_metrics  # noqa: PLC0415

    clients, rounds = (2, 3) if quick else (10, 6)
    keys = ("round-wall-seconds", "leakage-monitor-seconds")
    splits = {"plain": {}, "label-private": {"label-private": True}}
    measured = {split: (Repeated(), Repeated(), Repeated()) for split in splits}
    for _ in range(repeats):
        for split, run_config in splits.items():
            off, on, monitor = measured[split]
            for watched, wall in ((False, off), (True, on)):
                figures = app_round_metrics(
                    "v1",
                    num_clients=clients,
                    rounds=rounds,
                    clients_at_once=min(clients, 4),
                    run_config={**run_config, "leakage-monitor": watched},
                    keys=keys if watched else keys[:1],
                )
                # Each run's steady rounds: its best round stands for the run.
                wall.add(figures["round-wall-seconds"].min)
                if watched:
                    monitor.add(figures["leakage-monitor-seconds"].min)
        report.out(f"  measured the monitor's cost, repeat {len(off.values)} of {repeats}")
    report.figures["monitor"] = {
        split: {
            "round_without": off.as_dict(),
            "round_with": on.as_dict(),
            "monitor_seconds": monitor.as_dict(),
        }
        for split, (off, on, monitor) in measured.items()
    }
    report.table(
        f"The leakage monitor's cost (SFLV1, {clients} clients, digits, 200 decoder steps on "
        f"270 of the ServerApp's test digits, 90 attacked; in the label-private split also 200 "
        f"steps of a surrogate head and the label attacks on the 90): seconds per steady round, "
        f"each run's best of {rounds - 1} rounds, min (median, spread) of {repeats} runs each way",
        [
            "split",
            "round without",
            "round with",
            "monitor alone",
            "with / without",
            "monitor / without",
        ],
        [
            [
                split,
                off.show(),
                on.show(),
                monitor.show(),
                ratio(on, off).show(),
                ratio(monitor, off).show(),
            ]
            for split, (off, on, monitor) in measured.items()
        ],
    )


def _plot_rounds(series: dict[str, dict[int, Repeated]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label, values in series.items():
        counts = sorted(values)
        axis.plot(
            counts,
            [values[n].min for n in counts],
            marker="o",
            linestyle="--" if "one process" in label else "-",
            label=label,
        )
    axis.set_xlabel("clients")
    axis.set_ylabel("seconds per steady round (min of repeats)")
    axis.set_title("A round of the digits app")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_bytes_and_cost(report: Report, *, sections: set[str], workloads: Sequence[str]) -> None:
    byte_rows, cost_rows = [], []
    for name in workloads:
        workload = WORKLOADS[name]
        split = workload.split()
        full = split.full_model()
        clients, samples = workload.num_clients, workload.samples_per_client
        sync = 2 * state_bytes(split.client_half) * clients
        fedavg = 2 * state_bytes(full) * clients
        total = samples * clients
        for compression in COMPRESSIONS:
            per_batch = frame_bytes(split, workload.batch_size, compression)
            byte_rows.append(
                [
                    name,
                    compression,
                    f"{per_batch / workload.batch_size:,.0f}",
                    f"{sync / total:,.1f}",
                    f"{fedavg / total:,.1f}",
                    f"{(per_batch / workload.batch_size * total + sync) / 1e6:,.1f} MB",
                    f"{fedavg / 1e6:,.2f} MB",
                ]
            )
        inputs = synthetic_partition(workload, client=0, samples=workload.batch_size)[0]
        client_cost, full_cost = cut_costs(
            workload.build(),
            sample_input=inputs,
            cuts=[workload.cut],
            batch_size=workload.batch_size,
        )
        cost_rows.append(
            [
                name,
                f"{client_cost.client_parameters:,} / {full_cost.client_parameters:,}",
                f"{client_cost.client_flops / 1e6:,.2f} / {full_cost.client_flops / 1e6:,.2f}",
                f"{client_cost.client_memory_bytes / 2**20:,.2f} / "
                f"{full_cost.client_memory_bytes / 2**20:,.2f}",
                f"{client_cost.client_flops / full_cost.client_flops:.1%}",
            ]
        )
    if "bytes" in sections:
        report.table(
            "Bytes per sample: data plane (up + down, per compression) and model sync, per round",
            [
                "workload",
                "compression",
                "data plane B/sample",
                "model sync B/sample",
                "FedAvg full model B/sample",
                "SplitFed per round",
                "FedAvg per round",
            ],
            byte_rows,
        )
    if "cost" in sections:
        report.table(
            "Client cost: client half / full model (training, one batch)",
            [
                "workload",
                "parameters",
                "fwd+bwd MFLOPs/sample",
                "training memory MiB",
                "client share of FLOPs",
            ],
            cost_rows,
        )


def run_scaling(report: Report, *, quick: bool) -> None:
    workload = WORKLOADS["W1"]
    clients = [1, 2, 4] if quick else [1, 2, 4, 8, 16]
    steps = 20 if quick else 200
    cores = os.cpu_count() or 1
    curves = {
        threads: measure_scaling(workload, clients=clients, steps=steps, server_threads=threads)
        for threads in sorted({cores, 1}, reverse=True)
    }
    report.figures["scaling"] = curves
    headers = ["clients"]
    for threads in curves:
        headers += [f"{threads} torch thread(s): batches/s", "x 1 client"]
    report.table(
        "SFLV1 split server throughput (W1 batches/s), clients that only send",
        headers,
        [
            [n]
            + [
                part
                for curve in curves.values()
                for part in (f"{curve[n]:,.0f}", f"{curve[n] / curve[clients[0]]:.2f}")
            ]
            for n in clients
        ],
    )


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a small run, for a smoke test")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=None,
        help=f"sections to run (default: all but scaling; with --quick: step, overhead, bytes, "
        f"cost); one of {', '.join(SECTIONS)}",
    )
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument(
        "--repeats", type=int, default=None, help="repetitions of each figure (default: 5; 2 quick)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write results.md, results.json and round_time.png here (e.g. docs/benchmark)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    default = ["step", "overhead", "bytes", "cost"] if args.quick else list(SECTIONS[:-1])
    sections = set(args.only or default)

    report = Report(out)
    report.say(f"Machine: {machine()}")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    report.say(f"Command: `python -m simulation.benchmark {shown}`".replace(" `", " `", 1))
    report.say(
        f"Figures: min (median, spread of {repeats} repeats); 'noisy' marks a spread above "
        f"{100 * NOISE_BOUND:.0f}%."
    )
    if "step" in sections:
        run_step(report, quick=args.quick, repeats=repeats)
    if "overhead" in sections:
        run_overhead(
            report,
            quick=args.quick,
            repeats=repeats,
            workloads=args.workloads,
            variants=args.variants,
        )
    if "messages" in sections:
        run_messages(report, repeats=min(repeats, 3))
    if "rounds" in sections:
        run_rounds(report, quick=args.quick, out_dir=args.out)
    if "monitor" in sections:
        run_monitor(report, quick=args.quick, repeats=min(repeats, 3))
    if sections & {"bytes", "cost"}:
        run_bytes_and_cost(report, sections=sections, workloads=args.workloads)
    if "scaling" in sections:
        run_scaling(report, quick=args.quick)
    if "network" in sections:
        run_network(
            report,
            quick=args.quick,
            repeats=repeats,
            workloads=args.workloads,
            out_dir=args.out,
        )
    if "accuracy" in sections:
        from .accuracy import run_accuracy  # noqa: PLC0415 - loads the app's data libraries

        run_accuracy(report, quick=args.quick, out_dir=args.out, repeats=min(repeats, 3))
    report.say(f"\nMachine at the end: {machine()}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(report.lines) + "\n")
        (args.out / "results.json").write_text(json.dumps(report.figures, indent=2, default=str))
        out(f"\nWrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(out=lambda line: print(line, flush=True)))
