"""Checkpoints: atomic files, the server-half trainers' state, and what a resume refuses."""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from flwr.app import ArrayRecord

from splitfed import CheckpointConfig, SplitFed, make_trainer
from splitfed.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from splitfed.strategies.splitfed import CHECKPOINT_FORMAT, SplitFedResult
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split


def activations_of(split, batch):
    images, labels = batch
    with torch.no_grad():
        return split.client_half(images), labels


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_save_then_load_gives_the_same_tensors_and_values(tmp_path):
    state = {"round": 3, "weights": {"w": torch.randn(4, 3)}, "history": {1: {"loss": 0.5}}}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["round"] == 3 and loaded["history"] == {1: {"loss": 0.5}}
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert load_checkpoint(tmp_path / "none.pt") is None
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"round": 1})
    # A process that writes a 400 MB checkpoint and is killed while it writes.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import torch
                from splitfed.checkpoint import save_checkpoint
                print("writing", flush=True)
                save_checkpoint({str(path)!r}, {{"round": 2, "w": torch.zeros(100_000_000)}})
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    while not any(name.startswith(".ckpt.pt.") for name in os.listdir(tmp_path)):
        assert writer.poll() is None, "the writer finished before it could be killed"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert load_checkpoint(path) == {"round": 1}


def test_a_torn_or_foreign_file_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Move it away to start the run afresh"):
        load_checkpoint(path)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_trainer_state_round_trips_through_a_checkpoint(variant, tmp_path):
    split = small_split()
    trainer = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    trainer.begin_round([1, 2])
    for node in (1, 2):
        trainer.step(node, *activations_of(split, digits_batches(0, 16, batch_size=16)[0]))
    save_checkpoint(tmp_path / "t.pt", trainer.state_dict())
    restored = make_trainer(
        variant, server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    restored.load_state_dict(load_checkpoint(tmp_path / "t.pt"))
    assert_same_state(trainer.server_half.state_dict(), restored.server_half.state_dict())
    # The restored optimizer continues exactly as the original one would.
    batch = activations_of(split, digits_batches(16, 16, batch_size=16)[0])
    for t in (trainer, restored):
        t.begin_round([1])
        if variant == "v1":
            t.load_merged(t.server_half.state_dict())
            t.begin_round([1])
        t.step(1, *batch)
    half = (lambda t: t.copy_for(1)) if variant == "v1" else (lambda t: t.server_half)
    assert_same_state(half(trainer).state_dict(), half(restored).state_dict())
    trainer.close()
    restored.close()


def test_sflv2_discarding_a_round_restores_the_half_and_its_optimizer():
    split = small_split()
    trainer = make_trainer(
        "v2", server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
    )
    batch = activations_of(split, digits_batches(0, 16, batch_size=16)[0])
    trainer.begin_round([1])
    trainer.step(1, *batch)
    before = copy.deepcopy(trainer.state_dict())
    trainer.begin_round([1])
    trainer.step(1, *batch)
    trainer.discard_round()
    assert_same_state(trainer.server_half.state_dict(), before["server_half"])
    momentum = before["optimizer"]["state"]
    for index, state in trainer.optimizer.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], momentum[index]["momentum_buffer"])
    trainer.close()


def strategy_with_checkpoint(path, fingerprint: str, **options) -> SplitFed:
    checkpoint = CheckpointConfig(path=path, fingerprint=fingerprint, **options)
    return SplitFed(split=small_split(), insecure=True, checkpoint=checkpoint)


def write_checkpoint(strategy: SplitFed, server_round: int = 2) -> None:
    result = SplitFedResult(arrays=ArrayRecord(small_split().client_state_dict()))
    save_checkpoint(strategy.checkpoint.path, strategy._checkpoint(server_round, result))


def test_a_checkpoint_of_another_run_configuration_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(strategy_with_checkpoint(path, "config-a"))
    with pytest.raises(CheckpointError, match="another run configuration"):
        strategy_with_checkpoint(path, "config-b")._resume(SplitFedResult())
    assert strategy_with_checkpoint(path, "config-a")._resume(SplitFedResult()) == 2
    checkpoint = load_checkpoint(path)
    save_checkpoint(path, {**checkpoint, "format": 99})
    with pytest.raises(CheckpointError, match=f"this version reads {CHECKPOINT_FORMAT}"):
        strategy_with_checkpoint(path, "config-a")._resume(SplitFedResult())


def test_no_checkpoint_starts_from_round_one(tmp_path):
    strategy = strategy_with_checkpoint(tmp_path / "none.pt", "config-a")
    assert strategy._resume(SplitFedResult()) == 0
    assert SplitFed(split=small_split(), insecure=True)._resume(SplitFedResult()) == 0


@pytest.mark.parametrize("global_rng", [False, True])
def test_global_random_generators_change_only_when_asked(tmp_path, global_rng):
    path = tmp_path / "checkpoint.pt"
    strategy = strategy_with_checkpoint(path, "a", global_rng=global_rng)
    random.seed(1)
    saved = random.random()
    random.seed(1)
    write_checkpoint(strategy)
    random.seed(2)
    strategy_with_checkpoint(path, "a", global_rng=global_rng)._resume(SplitFedResult())
    # Restored, the next draw is the one after the checkpoint; untouched, the one after seed 2.
    assert (random.random() == saved) is global_rng
