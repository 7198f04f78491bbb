"""Accuracy of every variant side by side, and against the wall time a network would give it:
the benchmark's ``accuracy`` section.

Each run trains the app's task (:mod:`simulation.app.task`: its data, partitions, model, cut,
optimizers, local epochs, batch order and seeding, from the app's run config) for the app's
number of rounds with every client in every round. The split variants train through the real
split server and data plane (gRPC on loopback) with the clients in threads of this process;
FedAvg trains the whole model on each client with a fresh optimizer each round, as the app's
baseline does. After each round the merged model is evaluated on the held-out test split, as the
ServerApp does.

The wall time of a round comes from rounds of the same task over the emulated network
(:class:`~simulation.benchmark.network.LinkRun`: a process per client, a link of
``TIME_PROFILE`` each); accuracy against time is accuracy after round ``r`` at ``r`` times that
variant's median steady round.
"""

from __future__ import annotations

import copy
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simulation.app.config import AppConfig
from simulation.app.task import (
    batch_spec,
    evaluate_model,
    federated_data,
    model_split,
    train_loader,
    whole_model,
)
from splitfed import (
    GrpcDataPlane,
    SplitModel,
    SplitServer,
    make_trainer,
    run_local_epochs,
    run_local_loss_epochs,
)

from .models import weighted_average
from .network import VARIANTS, LinkProfile, Task, Variant, _write, measure_network
from .stats import Repeated

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "TIME_PROFILE",
    "AccuracyResults",
    "accuracy_curve",
    "measure_accuracy",
    "plot_accuracy_vs_time",
    "run_accuracy",
]

DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": "digits", "model": "cnn"},
    "breast-cancer": {"dataset": "breast-cancer", "model": "mlp"},
}
"""The tasks, as run-config keys (the rest are the app's defaults)."""
PARTITIONS: dict[str, dict[str, Any]] = {
    "IID": {"partitioner": "iid"},
    "Dirichlet 0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
}
TIME_PROFILE = LinkProfile(0.050, 100e6)
"""The network accuracy is plotted against: 50 ms round trip, 100 Mbit/s each way."""
NUM_CLIENTS = 10
"""As the app's demo (``--num-supernodes 10``); every client trains in every round."""
GOAL_POINTS = 1.0
"""Goal: local-loss final accuracy at most this many points below SFLV1's (digits, IID)."""


def _config(run_config: Mapping[str, Any], variant: Variant) -> AppConfig:
    return AppConfig.from_run_config(
        {**run_config, "variant": variant.name, "send-every": variant.send_every}
    )


def accuracy_curve(
    run_config: Mapping[str, Any], variant: Variant, *, num_clients: int = NUM_CLIENTS
) -> list[float]:
    """Test accuracy of the merged model before training and after each of the run config's
    ``num-server-rounds`` rounds of ``variant``."""
    config = _config(run_config, variant)
    data = federated_data(config, num_partitions=num_clients)
    test_inputs, test_labels = data.central_test()
    # Seeded as the ServerApp seeds its process: the initial weights follow the seed.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # clients and the server half share this process
    try:
        if variant.split:
            return _split_curve(config, data, variant, num_clients, test_inputs, test_labels)
        return _fedavg_curve(config, data, num_clients, test_inputs, test_labels)
    finally:
        torch.set_num_threads(previous)


def _fedavg_curve(
    config: AppConfig,
    data: Any,
    num_clients: int,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
) -> list[float]:
    model = whole_model(config, data)
    unpack = batch_spec(data).unpack
    curve = [evaluate_model(model, test_inputs, test_labels)[1]]
    for server_round in range(1, config.num_server_rounds + 1):
        states, weights = [], []
        start = copy.deepcopy(model.state_dict())
        for client in range(num_clients):
            model.load_state_dict(start)
            model.train()
            optimizer = config.client_optimizer.build(model.parameters())
            examples = 0
            # One loader for every epoch, whose order moves on from epoch to epoch, as the app's.
            loader = train_loader(config, data, partition_id=client, server_round=server_round)
            for _ in range(config.local_epochs):
                for raw in loader:
                    inputs, labels = unpack(raw)
                    optimizer.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(inputs), labels).backward()
                    optimizer.step()
                    examples += len(labels)
            states.append(copy.deepcopy(model.state_dict()))
            weights.append(examples)
        model.load_state_dict(weighted_average(states, weights))
        curve.append(evaluate_model(model, test_inputs, test_labels)[1])
    return curve


def _split_curve(
    config: AppConfig,
    data: Any,
    variant: Variant,
    num_clients: int,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
) -> list[float]:
    split = model_split(config, data, client_side=False)
    local_loss = variant.name == "local-loss"
    trainer = make_trainer(
        variant.name,
        server_copies=config.server_copies if local_loss else None,
        server_half=copy.deepcopy(split.server_half),
        optimizer=config.server_optimizer,
    )
    server = SplitServer.for_split(
        split,
        trainer=trainer,
        insecure=True,  # loopback only
        local_loss=local_loss,
    )
    server.start()
    clients = [split.client_copy() for _ in range(num_clients)]
    # Client optimizers keep their state from round to round, as the app's do.
    optimizers = [config.client_optimizer.build(c.client_parameters()) for c in clients]
    global_state = split.client_state_dict()
    batch = batch_spec(data)

    def evaluate() -> float:
        split.load_client_state_dict(global_state)
        split.server_half.load_state_dict(trainer.server_half.state_dict())
        return evaluate_model(split.full_model(), test_inputs, test_labels)[1]

    curve = [evaluate()]
    nodes = list(range(1, num_clients + 1))
    try:
        for server_round in range(1, config.num_server_rounds + 1):
            tokens = server.open_round(server_round, nodes)
            with ThreadPoolExecutor(max_workers=num_clients) as pool:
                futures = [
                    pool.submit(
                        _train_client,
                        clients[client],
                        optimizers[client],
                        variant=variant,
                        state=global_state,
                        address=str(server.address),
                        node=nodes[client],
                        server_round=server_round,
                        token=tokens[nodes[client]],
                        loader=train_loader(
                            config, data, partition_id=client, server_round=server_round
                        ),
                        local_epochs=config.local_epochs,
                        batch=batch,
                    )
                    for client in range(num_clients)
                ]
                try:
                    done = [future.result() for future in futures]
                finally:
                    server.close_round()
            weights = [examples for _, examples in done]
            global_state = weighted_average([state for state, _ in done], weights)
            copies = trainer.client_copies(nodes)
            if copies:
                trainer.load_merged(
                    weighted_average([copies[n].state_dict() for n in nodes], weights)
                )
            curve.append(evaluate())
    finally:
        server.stop(grace=None)
    return curve


def _train_client(
    split: SplitModel,
    optimizer: torch.optim.Optimizer,
    *,
    variant: Variant,
    state: dict[str, torch.Tensor],
    address: str,
    node: int,
    server_round: int,
    token: str,
    loader: Any,
    local_epochs: int,
    batch: Any,
) -> tuple[dict[str, torch.Tensor], int]:
    """One client's round through the split server: its updated client side and examples."""
    split.load_client_state_dict(state)
    with GrpcDataPlane(
        address=address, node_id=node, server_round=server_round, token=token
    ) as plane:
        common = {
            "split": split,
            "data_plane": plane,
            "train_loader": loader,
            "optimizer": optimizer,
            "local_epochs": local_epochs,
            "batch": batch,
        }
        if variant.name == "local-loss":
            stats = run_local_loss_epochs(**common, send_every=variant.send_every)
        else:
            stats = run_local_epochs(**common)
    return split.client_state_dict(), stats.num_examples


@dataclass
class AccuracyResults:
    """Accuracy curves by (dataset, partition, variant), one per seed, and the seconds of a
    steady round by (dataset, partition, variant) over the emulated network."""

    curves: dict[tuple[str, str, Variant], list[list[float]]]
    round_seconds: dict[tuple[str, str, Variant], Repeated]
    seeds: Sequence[int]
    rounds: int

    def final(self, dataset: str, partition: str, variant: Variant) -> tuple[float, float]:
        """Mean and standard deviation over seeds of the final accuracy, in points (%)."""
        finals = [100 * curve[-1] for curve in self.curves[dataset, partition, variant]]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        return statistics.fmean(finals), spread


def measure_accuracy(
    *,
    datasets: Sequence[str],
    partitions: Sequence[str],
    seeds: Sequence[int],
    variants: Sequence[Variant] = VARIANTS,
    num_clients: int = NUM_CLIENTS,
    rounds: int | None = None,
    time_repeats: int = 3,
    progress: Callable[[str], None] = lambda _: None,
) -> AccuracyResults:
    """Every curve, then the round times of each task (seed 0's partition) over
    :data:`TIME_PROFILE`."""
    extra = {} if rounds is None else {"num-server-rounds": rounds}
    curves: dict[tuple[str, str, Variant], list[list[float]]] = {}
    for dataset in datasets:
        for partition in partitions:
            for variant in variants:
                for seed in seeds:
                    run_config = {
                        **DATASETS[dataset],
                        **PARTITIONS[partition],
                        **extra,
                        "seed": seed,
                    }
                    curve = accuracy_curve(run_config, variant, num_clients=num_clients)
                    curves.setdefault((dataset, partition, variant), []).append(curve)
                progress(f"  trained {dataset}, {partition}, {variant.label}")
    round_seconds: dict[tuple[str, str, Variant], Repeated] = {}
    for dataset in datasets:
        for partition in partitions:
            run_config = {**DATASETS[dataset], **PARTITIONS[partition], "seed": seeds[0]}
            task = Task.app(run_config, num_clients=num_clients)
            rounds_over = measure_network(
                task, variants=variants, profiles=[TIME_PROFILE], repeats=time_repeats
            )
            for variant in variants:
                series = Repeated()
                series.values = [f.seconds for f in rounds_over[variant, TIME_PROFILE]]
                round_seconds[dataset, partition, variant] = series
            progress(f"  timed {dataset}, {partition} at {TIME_PROFILE.label}")
    count = len(next(iter(curves.values()))[0]) - 1
    return AccuracyResults(curves, round_seconds, list(seeds), count)


def plot_accuracy_vs_time(results: AccuracyResults, path: Path, *, title: str) -> Path:
    """Accuracy (mean over seeds, the band one standard deviation) against simulated wall
    time: a panel per task and partition, a line per variant."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = sorted({(d, p) for d, p, _ in results.curves}, key=lambda k: (k[0] != "digits", k))
    datasets = list(dict.fromkeys(d for d, _ in panels))
    partitions = list(dict.fromkeys(p for _, p in panels))
    figure, axes = plt.subplots(
        len(datasets),
        len(partitions),
        figsize=(5.2 * len(partitions), 3.8 * len(datasets)),
        squeeze=False,
        constrained_layout=True,
    )
    variants = list(dict.fromkeys(v for _, _, v in results.curves))
    for row, dataset in enumerate(datasets):
        for column, partition in enumerate(partitions):
            axis = axes[row][column]
            for variant in variants:
                curves = np.array(results.curves[dataset, partition, variant]) * 100
                seconds = results.round_seconds[dataset, partition, variant].median
                times = seconds * np.arange(curves.shape[1])
                mean, std = curves.mean(axis=0), curves.std(axis=0)
                (line,) = axis.plot(times, mean, marker=".", label=variant.label)
                axis.fill_between(times, mean - std, mean + std, alpha=0.15, color=line.get_color())
            axis.set_title(f"{dataset}, {partition}", fontsize="medium")
            axis.set_xlabel(f"simulated wall time, s ({TIME_PROFILE.label} per client)")
            axis.set_ylabel("test accuracy, %")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small", loc="lower right")
    figure.suptitle(title, fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run_accuracy(
    report: Any, *, quick: bool, out_dir: Path | None = None, repeats: int = 3
) -> AccuracyResults:
    """The ``accuracy`` section: the final-accuracy table, the round times it is plotted with,
    the goals, and ``accuracy_vs_time.png``, ``accuracy.md`` and ``accuracy.json`` in
    ``out_dir``."""
    first_line = len(report.lines)
    if quick:
        datasets, partitions, seeds = ["digits"], list(PARTITIONS), [0]
        results = measure_accuracy(
            datasets=datasets,
            partitions=partitions,
            seeds=seeds,
            num_clients=4,
            rounds=2,
            time_repeats=2,
            progress=report.out,
        )
        clients = 4
    else:
        datasets, partitions, seeds = list(DATASETS), list(PARTITIONS), [0, 1, 2]
        results = measure_accuracy(
            datasets=datasets,
            partitions=partitions,
            seeds=seeds,
            time_repeats=repeats,
            progress=report.out,
        )
        clients = NUM_CLIENTS
    variants = list(dict.fromkeys(v for _, _, v in results.curves))
    v1, local = Variant("v1"), Variant("local-loss", 1)

    def row(dataset: str, partition: str) -> list[str]:
        finals = {v: results.final(dataset, partition, v) for v in variants}
        gap = finals[local][0] - finals[v1][0]
        cells = [f"{mean:.1f} ± {std:.1f}" for mean, std in finals.values()]
        return [dataset, partition, *cells, f"**{gap:+.1f}**"]

    report.table(
        f"Final test accuracy after {results.rounds} rounds, %, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}: the app's task (run-config defaults; breast-cancer with "
        f"model='mlp'), {clients} clients, all in every round",
        ["task", "partition", *(v.label for v in variants), "local-loss k=1 - SFLV1"],
        [row(dataset, partition) for dataset in datasets for partition in partitions],
    )
    report.table(
        f"Seconds per steady round at {TIME_PROFILE.label} per client (the plot's time axis), "
        f"the seed-{seeds[0]} partition, median (min, spread) of "
        f"{len(next(iter(results.round_seconds.values())).values)}",
        ["task", "partition", *(v.label for v in variants)],
        [
            [
                dataset,
                partition,
                *(_median_first(results.round_seconds[dataset, partition, v]) for v in variants),
            ]
            for dataset in datasets
            for partition in partitions
        ],
    )
    goals = []
    if "digits" in datasets:
        gap = results.final("digits", "IID", v1)[0] - results.final("digits", "IID", local)[0]
        goals.append(
            f"digits IID: local-loss k=1 ends {_points(-gap)} SFLV1 (mean of {len(seeds)} "
            f"seed(s); goal at most {GOAL_POINTS:g} point below): "
            f"{'met' if gap <= GOAL_POINTS else 'NOT met'}"
        )
        for partition in partitions:
            if partition != "IID":
                cost = (
                    results.final("digits", partition, v1)[0]
                    - results.final("digits", partition, local)[0]
                )
                goals.append(f"digits {partition}: local-loss k=1 ends {_points(-cost)} SFLV1")
    report.say("\nGoals:\n")
    for line in goals:
        report.say(f"- {line}")
    report.figures["accuracy"] = {
        "curves": {
            f"{d} | {p} | {v.label}": curves for (d, p, v), curves in results.curves.items()
        },
        "round_seconds": {
            f"{d} | {p} | {v.label}": series.values
            for (d, p, v), series in results.round_seconds.items()
        },
        "goals": goals,
    }
    if out_dir is not None:
        picture = plot_accuracy_vs_time(
            results,
            out_dir / "accuracy_vs_time.png",
            title=f"Test accuracy against wall time over a {TIME_PROFILE.label} link, mean of "
            f"{len(seeds)} seed(s), {clients} clients",
        )
        report.say(f"\nAccuracy against simulated wall time: {picture}")
        _write(out_dir, "accuracy", report, first_line, report.figures["accuracy"])
    return results


def _points(difference: float) -> str:
    side = "above" if difference > 0 else "below"
    return f"{abs(difference):.1f} points {side}"


def _median_first(series: Repeated) -> str:
    return f"{series.median:.3f} ({series.min:.3f}, {100 * series.spread:.0f}%)"
