"""Shared test pieces: a small model with buffers, digits batches, running split servers, and the
processes of Flower's engines (to check that a test leaves none behind)."""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from simulation.task import load_digits_split
from splitfed import (
    GrpcDataPlane,
    OptimizerConfig,
    SplitModel,
    SplitServer,
    TrainStats,
    make_trainer,
    run_local_epochs,
    split_model,
)

SGD_MOMENTUM = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)


def small_cnn(seed: int = 0) -> nn.Sequential:
    """A model whose client half carries BatchNorm buffers; cut after ``pool``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, kernel_size=3, padding=1),
            norm=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(4 * 4 * 4, 10),
        )
    )


def small_split(seed: int = 0) -> SplitModel:
    return split_model(small_cnn(seed), cut="pool", sample_input=torch.zeros(2, 1, 8, 8))


def digits_batches(
    start: int, count: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training digits from index ``start``, in order, as a list of batches."""
    data = load_digits_split()
    images = data.train_images[start : start + count]
    labels = data.train_labels[start : start + count]
    return [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, count, batch_size)
    ]


def start_split_server(
    split: SplitModel, *, variant: str, optimizer: OptimizerConfig = SGD_MOMENTUM
) -> SplitServer:
    trainer = make_trainer(variant, server_half=split.server_half, optimizer=optimizer)
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        activation_dtype=split.activation_dtype,
        insecure=True,  # loopback only
    )
    server.start()
    return server


@pytest.fixture
def split_server_factory() -> Iterator:
    """Start split servers for a test and stop them all afterwards, also when it fails."""
    servers: list[SplitServer] = []

    def factory(split: SplitModel, *, variant: str, optimizer: OptimizerConfig = SGD_MOMENTUM):
        server = start_split_server(split, variant=variant, optimizer=optimizer)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop(grace=None)


def train_through(
    server: SplitServer,
    token: str,
    *,
    node_id: int,
    server_round: int,
    client_half: nn.Module,
    batches: list,
    optimizer: torch.optim.Optimizer,
    local_epochs: int = 1,
) -> TrainStats:
    """One client's local training over a real gRPC stream."""
    with GrpcDataPlane(
        address=server.address, node_id=node_id, server_round=server_round, token=token
    ) as plane:
        return run_local_epochs(
            client_half=client_half,
            data_plane=plane,
            train_loader=batches,
            optimizer=optimizer,
            local_epochs=local_epochs,
        )


def train_round_concurrently(
    server: SplitServer,
    split: SplitModel,
    batches_by_node: dict[int, list],
    *,
    local_epochs: int = 1,
) -> tuple[dict[int, nn.Module], dict[int, TrainStats]]:
    """Open round 1 for the nodes of ``batches_by_node`` and train them all at the same time.

    Each node trains its own copy of the client half with SGD_MOMENTUM over a real gRPC stream.
    """
    tokens = server.open_round(1, list(batches_by_node))
    client_halves = {n: copy.deepcopy(split.client_half) for n in batches_by_node}
    results = run_concurrently(
        *(
            lambda n=n: train_through(
                server,
                tokens[n],
                node_id=n,
                server_round=1,
                client_half=client_halves[n],
                batches=batches_by_node[n],
                optimizer=SGD_MOMENTUM.build(client_halves[n].parameters()),
                local_epochs=local_epochs,
            )
            for n in batches_by_node
        )
    )
    return client_halves, dict(zip(batches_by_node, results, strict=True))


def run_concurrently(*calls) -> list:
    """Run zero-argument callables on threads at the same time; re-raise the first failure."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call) -> None:
        try:
            results[i] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# Command-line fragments of the processes Flower's engines start: SuperLink, SuperNodes, their
# executors and the apps they run, the simulation and Ray.
FLOWER_PROCESSES = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr-simulation",
    "raylet",
    "gcs_server",
)


def flower_processes(*, flwr_home_under: Path | None = None) -> set[int]:
    """PIDs of processes that belong to a Flower simulation or deployment.

    With ``flwr_home_under``, only those whose ``FLWR_HOME`` lies in that folder: the processes
    of one deployment, not those of other runs on the machine.
    """
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            if not any(name in command for name in FLOWER_PROCESSES):
                continue
            if flwr_home_under is not None and not _flwr_home_under(int(entry), flwr_home_under):
                continue
        except OSError:
            continue
        found.add(int(entry))
    return found


def _flwr_home_under(pid: int, folder: Path) -> bool:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        for variable in environ.read().split(b"\0"):
            if variable.startswith(b"FLWR_HOME="):
                home = Path(variable.split(b"=", 1)[1].decode(errors="replace"))
                return home.is_relative_to(folder)
    return False
