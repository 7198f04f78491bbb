"""What a user's round costs: the app's round under ``flwr run`` against the same rounds in one
process, clients one after another (as the original SplitFed scripts train), and against
Flower's own FedAvg of the unsplit model on the same engine, data and clients."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from simulation.app.config import AppConfig
from simulation.app.task import federated_data, model_split, train_loader
from splitfed import make_trainer

from .models import weighted_average
from .stats import Repeated

__all__ = ["app_round_metrics", "app_rounds", "sequential_rounds"]


def sequential_rounds(
    variant: str, *, num_clients: int, rounds: int, run_config: dict[str, Any] | None = None
) -> Repeated:
    """Seconds per round of the app's task trained in this process, clients one after another,
    the server half called directly (no data plane); the first round is left out."""
    config = AppConfig.from_run_config({**(run_config or {}), "variant": variant})
    data = federated_data(config, num_partitions=num_clients)
    torch.manual_seed(config.seed)
    split = model_split(config, data, client_side=False)
    trainer = make_trainer(
        config.variant,
        server_half=copy.deepcopy(split.server_half),
        optimizer=config.server_optimizer,
    )
    clients = [split.client_copy() for _ in range(num_clients)]
    optimizers = [config.client_optimizer.build(c.client_parameters()) for c in clients]
    global_state = split.client_state_dict()
    key_in, key_label = data.input_key, data.label_key
    seconds = Repeated()
    try:
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            nodes = list(range(num_clients))
            trainer.begin_round(nodes)
            examples = []
            for node, client, optimizer in zip(nodes, clients, optimizers, strict=True):
                client.load_client_state_dict(global_state)
                count = 0
                for _ in range(config.local_epochs):
                    loader = train_loader(
                        config, data, partition_id=node, server_round=server_round
                    )
                    for batch in loader:
                        activations = client.client_half(batch[key_in])
                        result = trainer.step(node, activations.detach(), batch[key_label])
                        optimizer.zero_grad(set_to_none=True)
                        activations.backward(result.cut_gradient)
                        optimizer.step()
                        count += len(batch[key_label])
                examples.append(count)
            global_state = weighted_average([c.client_state_dict() for c in clients], examples)
            copies = trainer.client_copies(nodes)
            if copies:
                trainer.load_merged(
                    weighted_average([copies[n].state_dict() for n in nodes], examples)
                )
            if server_round > 1:
                seconds.add(time.perf_counter() - started)
    finally:
        trainer.close()
    return seconds


def app_rounds(
    variant: str,
    *,
    num_clients: int,
    rounds: int,
    clients_at_once: int,
    run_config: dict[str, Any] | None = None,
) -> Repeated:
    """Seconds per round of the app under ``flwr run`` on the simulation engine (training and
    the ServerApp's central evaluation; no federated evaluation), the first round left out.

    The time is measured in the ServerApp between the ends of consecutive rounds, the same way
    for SplitFed and for FedAvg (``variant="fedavg"``).
    """
    return app_round_metrics(
        variant,
        num_clients=num_clients,
        rounds=rounds,
        clients_at_once=clients_at_once,
        run_config=run_config,
    )["round-wall-seconds"]


def app_round_metrics(
    variant: str,
    *,
    num_clients: int,
    rounds: int,
    clients_at_once: int,
    run_config: dict[str, Any] | None = None,
    keys: tuple[str, ...] = ("round-wall-seconds",),
) -> dict[str, Repeated]:
    """Per key, the app's round metric over the rounds of one run (as :func:`app_rounds`),
    the first round left out."""
    from simulation.launch.simulation_engine import run_app  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as out:
        result = run_app(
            run_config={
                **(run_config or {}),
                "variant": variant,
                "num-server-rounds": rounds,
                "fraction-evaluate": 0.0,
                "min-train-nodes": num_clients,
            },
            num_supernodes=num_clients,
            clients_at_once=clients_at_once,
            output_dir=Path(out),
            echo=False,
            timeout=1800,
        )
    if not result.completed:
        raise RuntimeError(result.failure_report())
    figures = {key: Repeated() for key in keys}
    for server_round in sorted(result.metrics)[1:]:
        for key in keys:
            figures[key].add(result.metrics[server_round][key])
    return figures
