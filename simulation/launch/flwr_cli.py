"""What the launchers share: running ``flwr run``, asking how a run ended, reporting it."""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from math import nan
from pathlib import Path
from typing import Any

from .processes import with_parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - flwr depends on tomli
    import tomli as tomllib

__all__ = [
    "APP_DIR",
    "LaunchResult",
    "add_run_arguments",
    "app_config_keys",
    "app_output_dir",
    "config_args",
    "default_output_dir",
    "flower_env",
    "flwr_run",
    "format_table",
    "parse_run_config",
    "read_metrics",
    "report",
    "run_status",
    "wait_healthy",
]

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app this repository runs: its pyproject.toml names the app in ``simulation/app``
and bundles only that folder (``fab-include``); the library comes from the environment."""


def app_config_keys(app_dir: Path) -> set[str]:
    """The run-config keys a Flower app declares (``[tool.flwr.app.config]``)."""
    with open(Path(app_dir) / "pyproject.toml", "rb") as file:
        pyproject = tomllib.load(file)
    return set(pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def app_output_dir(keys: set[str], output_dir: Path) -> dict[str, str]:
    """The ``output-dir`` override for an app that has the key (this repository's does), where
    its ServerApp writes the model, metrics and picture; nothing for an app without it."""
    return {"output-dir": str(output_dir)} if "output-dir" in keys else {}


def default_output_dir() -> Path:
    """A new folder under ``./outputs/`` named by the time, for a run's model and metrics."""
    return Path.cwd() / "outputs" / time.strftime("%Y%m%d-%H%M%S")


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of Flower's processes: a private ``FLWR_HOME``, no telemetry, no runtime
    installs, this interpreter's ``bin`` first on ``PATH``."""
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


@dataclass
class LaunchResult:
    """How a launched run ended."""

    status: str
    details: str
    run_id: int | None
    seconds: float
    output_dir: Path
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    log: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def failure_report(self, lines: int = 60) -> str:
        """The run's status details and the end of its log, for error messages."""
        tail = "".join(self.log.splitlines(keepends=True)[-lines:])
        return f"run {self.run_id} {self.status}: {self.details}\n--- last log lines ---\n{tail}"


def config_args(values: dict[str, Any]) -> str:
    # TOML literals: strings quoted, booleans lower case.
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def wait_healthy(
    port: int,
    supervisor: subprocess.Popen,
    log_path: Path,
    timeout: float,
    *,
    tls: ssl.SSLContext | None = None,
) -> None:
    # ``tls``: how to verify a SuperLink that serves HTTPS; ``None`` for plain HTTP.
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early; its log: {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=tls) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"flower-superlink was not ready after {timeout:.0f} s; its log: {log_path}")


def read_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """The per-round metrics the ServerApp wrote, by round; empty if it wrote none."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        return {}
    return {int(r): values for r, values in json.loads(metrics_file.read_text()).items()}


def flwr_run(
    args: list[str],
    *,
    env: dict[str, str],
    timeout: float,
    echo: bool,
    lines: list[str],
    connection: str,
) -> tuple[str, str, int | None]:
    """Run ``flwr run ARGS...``, collect its output in ``lines``, and return how the run ended:
    ``(status, details, run_id)``. The run is stopped after ``timeout`` seconds."""
    flwr_run = subprocess.Popen(
        with_parent([str(Path(sys.executable).parent / "flwr"), "run", *args]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    run_id = None
    timed_out = threading.Event()
    watchdog = threading.Timer(timeout, lambda: (timed_out.set(), flwr_run.kill()))
    watchdog.start()
    try:
        assert flwr_run.stdout is not None
        for line in flwr_run.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if run_id is None and (match := re.search(r"Successfully started run (\d+)", line)):
                run_id = int(match.group(1))
        flwr_run.wait()
    finally:
        watchdog.cancel()
        if flwr_run.poll() is None:
            flwr_run.kill()
            flwr_run.wait()
    status, details = run_status(env, run_id, connection=connection)
    if timed_out.is_set():
        status, details = "timed-out", f"stopped after {timeout:.0f} s; {details}"
    return status, details, run_id


def run_status(env: dict[str, str], run_id: int | None, *, connection: str) -> tuple[str, str]:
    """Ask the SuperLink how the run ended (``flwr run`` exits 0 even when the ServerApp fails)."""
    if run_id is None:
        return "not-started", "flwr run did not start a run; see the output above"
    listing = subprocess.run(
        [
            str(Path(sys.executable).parent / "flwr"),
            "ls",
            connection,
            "--run-id",
            str(run_id),
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        run = json.loads(listing.stdout)["runs"][0]
        status, details = run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        status, details = "unknown", (listing.stdout + listing.stderr)[-2000:]
    return status, details


def format_table(metrics: dict[int, dict[str, float]]) -> str:
    """The per-round table the launcher prints at the end: accuracy and loss (central, or the
    clients' federated evaluation where the ServerApp holds no whole model), what crossed the
    data plane and the model sync, the leakage monitor's re-identification and labels recovered
    where it ran, and the round's seconds."""
    rounds = [metrics[r] for r in sorted(metrics)]
    central = any("test-accuracy" in m for m in rounds)
    prefix = "test" if central else "federated-eval"
    watched = any("leakage-reidentification" in m for m in rounds)
    columns: list[tuple[str, int, Callable[[dict[str, float]], str]]] = [
        (
            "test acc" if central else "fed acc",
            8,
            lambda m: f"{m.get(f'{prefix}-accuracy', nan):.4f}",
        ),
        (
            "test loss" if central else "fed loss",
            9,
            lambda m: f"{m.get(f'{prefix}-loss', nan):.4f}",
        ),
        ("data plane", 10, lambda m: f"{m.get('data-plane-bytes', nan) / 1e6:.2f} MB"),
        ("model sync", 10, lambda m: f"{m.get('model-sync-bytes', nan) / 1e6:.2f} MB"),
    ]
    if watched:

        def leakage(m: dict[str, float]) -> str:
            if "leakage-reidentification" not in m:
                return "-"
            return (
                f"{m['leakage-reidentification']:.2f} ({m['leakage-reidentification-chance']:.2f})"
            )

        columns.append(("re-id (chance)", 14, leakage))
    if any("leakage-label-surrogate" in m for m in rounds):

        def labels(m: dict[str, float]) -> str:
            if "leakage-label-surrogate" not in m:
                return "-"
            recovered = max(m["leakage-label-surrogate"], m.get("leakage-label-head-forward", 0.0))
            return f"{recovered:.2f} ({m['leakage-label-chance']:.2f})"

        columns.append(("labels (chance)", 15, labels))
    columns.append(("seconds", 7, lambda m: f"{m.get('round-seconds', nan):.2f}"))
    header = "  ".join([f"{'round':>5}", *(f"{name:>{width}}" for name, width, _ in columns)])
    rows = [header, "-" * len(header)]
    for server_round, m in zip(sorted(metrics), rounds, strict=True):
        cells = [f"{server_round:>5}", *(f"{show(m):>{width}}" for _, width, show in columns)]
        rows.append("  ".join(cells))
    return "\n".join(rows)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both launchers share: run config, output folder, timeout, quiet."""
    parser.add_argument(
        "--run-config",
        default="",
        help="run-config overrides, e.g. \"num-server-rounds=5 variant='v2'\"",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/<time>/")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds (default: 1800)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def parse_run_config(text: str) -> dict[str, Any]:
    """``--run-config`` text as Flower reads it."""
    from flwr.common.config import parse_config_args  # noqa: PLC0415 - keeps --help fast

    return parse_config_args([text]) if text else {}


def report(result: LaunchResult) -> int:
    """Print the per-round table and how the run ended; the exit code."""
    print()
    if result.metrics:
        print(format_table(result.metrics))
        print(f"\nModel, metrics and logs: {result.output_dir}")
        picture = result.output_dir / "metrics.png"
        if picture.exists():
            print(f"Picture of the run:      {picture}")
    print(f"Run {result.run_id}: {result.status} in {result.seconds:.1f} s")
    if not result.completed:
        print(result.details, file=sys.stderr)
        return 1
    return 0
