"""The benchmark's pieces: workloads cut where they say, bytes and costs add up, and the command
runs end to end at a small scale. No test asserts a wall time."""

from __future__ import annotations

import pytest
import torch

from simulation.benchmark.benchmark import main
from simulation.benchmark.measure import frame_bytes, state_bytes
from simulation.benchmark.models import WORKLOADS, batches, synthetic_partition
from splitfed import cut_costs


@pytest.mark.parametrize(("name", "activation_shape"), [("W1", (6, 14, 14)), ("W2", (16, 32, 32))])
def test_workloads_cut_after_their_first_block(name, activation_shape) -> None:
    split = WORKLOADS[name].split()
    assert split.activation_shape == activation_shape
    x = torch.zeros(2, *WORKLOADS[name].input_shape)
    assert split.full_model()(x).shape == (2, 10)


def test_synthetic_data_is_the_same_every_time_and_differs_by_client() -> None:
    w1 = WORKLOADS["W1"]
    a = synthetic_partition(w1, client=0, samples=40)
    again = synthetic_partition(w1, client=0, samples=40)
    assert all(torch.equal(u, v) for u, v in zip(a, again, strict=True))
    assert not torch.equal(a[0], synthetic_partition(w1, client=1, samples=40)[0])
    assert [len(y) for _, y in batches(*a, 32)] == [32, 8]


def test_frame_bytes_shrink_with_compression_as_the_codecs_say() -> None:
    split = WORKLOADS["W1"].split()
    values = 32 * 6 * 14 * 14
    plain = frame_bytes(split, 32, "none")
    assert plain > 2 * values * 4
    assert plain - frame_bytes(split, 32, "fp16") == pytest.approx(2 * values * 2, abs=64)
    assert plain - frame_bytes(split, 32, "int8-row") == pytest.approx(
        2 * (values * 3 - 32 * 4), abs=64
    )


def test_client_half_costs_a_fraction_of_the_full_model() -> None:
    workload = WORKLOADS["W1"]
    inputs = torch.randn(4, 1, 28, 28)
    client, full = cut_costs(workload.build(), sample_input=inputs, cuts=[workload.cut])
    assert client.client_parameters == 6 * 25 + 6
    assert full.client_parameters == sum(p.numel() for p in workload.build().parameters())
    # conv1 forward alone: 28 * 28 * 6 outputs of 25 multiply-adds, 2 FLOPs each.
    assert client.client_flops >= 2 * 28 * 28 * 6 * 25
    assert 0 < client.client_flops < full.client_flops
    assert 0 < client.client_memory_bytes < full.client_memory_bytes
    assert state_bytes(workload.split().client_half) == client.client_state_bytes == 156 * 4


@pytest.mark.slow
def test_quick_benchmark_prints_every_table(capsys) -> None:
    sections = ["step", "overhead", "messages", "bytes", "cost", "scaling"]
    assert main(["--quick", "--workloads", "W1", "--variants", "v1", "--only", *sections]) == 0
    printed = capsys.readouterr().out
    for title in (
        "Data-plane step",
        "Parallel clients",
        "One Flower message per batch",
        "Bytes per sample",
        "Client cost",
        "throughput",
    ):
        assert title in printed
    assert "int8-row" in printed
