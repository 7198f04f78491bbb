"""Load: 100 simulated clients, a tenth of them per round, on the two-node Ray cluster."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

NUM_CLIENTS, ROUNDS = 100, 3


def test_a_hundred_clients_a_tenth_per_round(launch):
    overrides = {"num-server-rounds": ROUNDS, "fraction-train": 0.1, "local-epochs": 1}
    result = launch(run_config=overrides, num_supernodes=NUM_CLIENTS)
    assert result.completed, result.failure_report()
    assert sorted(result.metrics) == list(range(1, ROUNDS + 1))
    for metrics in result.metrics.values():
        assert metrics["clients"] == NUM_CLIENTS // 10
        assert metrics["failed-clients"] == 0 and metrics["refused-streams"] == 0
        assert metrics["merged"] == 1 and metrics["data-plane-batches"] > 0
    # Peak memory, for the record: the server process (SuperLink's simulation process, which
    # holds the ServerApp and the split server) and the ClientApp processes (averaged).
    memory = {
        r: {
            "server-peak-rss-mb": m["server-peak-rss-mb"],
            "client-peak-rss-mb": m["train-peak-rss-mb"],
        }
        for r, m in result.metrics.items()
    }
    (result.output_dir / "memory.json").write_text(json.dumps(memory, indent=2))
    print(f"peak memory by round: {memory}")
    # Peaks only grow; rounds with new clients must not add more than a little.
    first, last = memory[1]["server-peak-rss-mb"], memory[ROUNDS]["server-peak-rss-mb"]
    assert first > 0 and last <= 1.25 * first, memory
