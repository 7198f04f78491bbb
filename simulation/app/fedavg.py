"""Flower's FedAvg on the whole model, with no split: the baseline beside SplitFed.

``variant = "fedavg"`` runs the same task (data, model, optimizer, rounds, evaluation) with every
client training the whole model for its local epochs and Flower's aggregator averaging it. Round
times of the two are measured the same way (``round-wall-seconds``, see
:func:`simulation.app.server_app.timed_evaluation`), which the benchmark compares.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader

from splitfed import BatchSpec, EvaluateStats, OptimizerConfig, TrainStats

__all__ = ["FEDAVG", "evaluate_reply", "train_reply"]

FEDAVG = "fedavg"
"""The run config's ``variant`` for this baseline."""


def train_reply(
    msg: Message,
    model: nn.Module,
    *,
    loader: DataLoader,
    batch: BatchSpec,
    optimizer: OptimizerConfig,
    local_epochs: int,
) -> Message:
    """Train ``model`` from the message's arrays for ``local_epochs`` on ``loader``; reply with
    its weights and the metrics SplitFed's clients report."""
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    model.train()
    optim = optimizer.build(model.parameters())
    stats = TrainStats()
    start = time.perf_counter()
    for _ in range(local_epochs):
        for raw in loader:
            inputs, labels = batch.unpack(raw)
            optim.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = nn.functional.cross_entropy(outputs, labels)
            loss.backward()
            optim.step()
            stats.num_examples += len(labels)
            stats.steps += 1
            stats.loss_sum += float(loss.detach()) * len(labels)
            stats.correct += int((outputs.detach().argmax(dim=1) == labels).sum())
    stats.seconds = time.perf_counter() - start
    reply = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(stats.metrics())}
    )
    return Message(reply, reply_to=msg)


@torch.no_grad()
def evaluate_reply(
    msg: Message, model: nn.Module, *, loader: DataLoader, batch: BatchSpec
) -> Message:
    """Evaluate the message's model on ``loader``; reply with SplitFed's evaluation metrics."""
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    model.eval()
    stats = EvaluateStats()
    for raw in loader:
        inputs, labels = batch.unpack(raw)
        outputs = model(inputs)
        stats.num_examples += len(labels)
        stats.loss_sum += float(nn.functional.cross_entropy(outputs, labels, reduction="sum"))
        stats.correct += int((outputs.argmax(dim=1) == labels).sum())
    return Message(RecordDict({"metrics": MetricRecord(stats.metrics())}), reply_to=msg)
