"""What the split server holds grows with the clients of a round, not with every client seen."""

from __future__ import annotations

import os

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from splitfed import SFLV1Trainer, make_trainer
from splitfed.strategies.splitfed import _cast_like
from tests.conftest import SGD_MOMENTUM


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_sflv1_memory_is_flat_over_a_thousand_distinct_clients():
    torch.manual_seed(0)
    server_half = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))  # 2 MB
    trainer = make_trainer("v1", server_half=server_half, optimizer=SGD_MOMENTUM)
    assert isinstance(trainer, SFLV1Trainer)
    activations, labels = torch.randn(8, 512), torch.arange(8)
    footprint = []
    for server_round in range(100):
        clients = list(range(server_round * 10, server_round * 10 + 10))  # ten new ones
        trainer.begin_round(clients)
        for node in clients:
            trainer.step(node, activations, labels)
        copies = trainer.client_copies(clients)
        assert len(copies) == 10
        merged = {
            key: torch.stack([c.state_dict()[key] for c in copies.values()]).mean(0)
            for key in trainer.server_half.state_dict()
        }
        trainer.load_merged(merged)
        footprint.append(resident_mb())
    # 1,000 clients each with a 2 MB copy and its momentum would hold 4 GB; only ten at a time
    # exist, and nothing of a client is kept after its round.
    assert footprint[-1] - footprint[9] < 40, footprint[::10]
    assert len(trainer._copies) == 0 and len(trainer._spare) <= 10
    assert set(trainer.state_dict()) == {"server_half"}


def test_merged_arrays_keep_their_dtypes_and_zero_dimensional_shapes():
    merged = ArrayRecord(
        {
            "tracked": Array(np.array(3.4)),  # FedAvg averages an int64 counter into a float
            "weight": Array(np.ones((2, 2), dtype=np.float64)),
        }
    )
    cast = _cast_like(merged, {"tracked": np.dtype(np.int64), "weight": np.dtype(np.float32)})
    state = cast.to_torch_state_dict()
    assert state["tracked"].shape == () and state["tracked"].dtype == torch.int64
    assert int(state["tracked"]) == 3
    assert state["weight"].dtype == torch.float32
