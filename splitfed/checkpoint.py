"""Checkpoints written atomically: a reader finds the previous complete one or the new one."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointConfig", "CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or belongs to another run configuration."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings and containers of them) to ``path``.

    The data goes to a temporary file in the same folder, is flushed to disk, and replaces
    ``path`` in one rename, so a process killed at any moment leaves either the old checkpoint
    or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Read a checkpoint written by :func:`save_checkpoint`; ``None`` if there is none.

    Only tensors and plain data are read back (``weights_only``): a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True)
        return state
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"cannot read the checkpoint {path}: {err}. Move it away to start the run afresh"
        ) from err


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how a SplitFed strategy checkpoints its run.

    After every round that merged, the strategy writes the global client half, the server half,
    the server-half optimizer state(s) and the metrics so far to ``path`` (atomically, see
    :func:`save_checkpoint`); a run that finds a checkpoint there resumes after its round.

    Parameters
    ----------
    path : str | Path
        The checkpoint file.
    fingerprint : str (default: "")
        Identifies the run configuration; a checkpoint written under another fingerprint is
        refused instead of resumed (e.g. a hash of the run config).
    global_rng : bool (default: False)
        Also save the process-global random number generators (Python's ``random``, NumPy's and
        torch's) and restore them on resume. Flower samples clients with ``random``, so a resumed
        run selects the clients an uninterrupted one would only with this on; it changes the
        global RNG state of the process that resumes.
    """

    path: str | Path
    fingerprint: str = ""
    global_rng: bool = False
