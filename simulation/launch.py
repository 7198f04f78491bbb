"""Run the app with ``flwr run`` on Flower's simulation engine, and leave nothing running after.

    python -m simulation.launch [--num-supernodes 10] [--run-config "variant='v2'"]

It starts a private SuperLink (simulation mode, a free port, its own ``FLWR_HOME``), runs the app
from this repository with ``flwr run ... --stream``, prints a per-round table of the merged model's
test accuracy and loss, the data-plane and model-sync bytes and the round's wall time, and stops
every process it started (SuperLink, simulation, Ray), also on failure or Ctrl-C. The final model
and the per-round metrics are written to ``--output-dir``.

With ``--ray-address HOST:PORT`` the simulation attaches to a running Ray cluster instead of
starting its own, and the ClientApps run wherever the cluster has room (``--client-cpus``,
``--client-gpus`` per ClientApp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .processes import die_with_parent, free_port

__all__ = ["LaunchResult", "run_app"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "splitfed-simulation"


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


def _config_args(values: dict[str, Any]) -> str:
    # TOML literals: strings quoted, booleans lower case.
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def _wait_healthy(
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


# What a Ray node that missed its start-up deadline prints; no round has run when it happens.
_RAY_START_FAILURE = "The current node timed out during startup"


def run_app(
    *,
    run_config: dict[str, Any] | None = None,
    num_supernodes: int = 10,
    clients_at_once: int = 4,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    ray_address: str | None = None,
    output_dir: Path | None = None,
    timeout: float = 1800.0,
    echo: bool = True,
    app_dir: Path = REPO_ROOT,
) -> LaunchResult:
    """Run the Flower app in ``app_dir`` on the simulation engine and wait for it to end.

    Parameters
    ----------
    run_config : dict[str, Any] | None (default: None)
        Run-config overrides (``--run-config``).
    num_supernodes : int (default: 10)
        Simulated clients, each with its own data partition.
    clients_at_once : int (default: 4)
        ClientApps that run at the same time on the private Ray instance the simulation starts
        (it gets ``clients_at_once * client_cpus`` CPUs). Ignored with ``ray_address``, where the
        cluster's resources decide.
    client_cpus : int (default: 1)
        CPUs each ClientApp reserves (Flower's ``client-resources-num-cpus``).
    client_gpus : float (default: 0.0)
        GPUs each ClientApp reserves; a fraction shares one GPU among clients.
    ray_address : str | None (default: None)
        ``HOST:PORT`` of a running Ray cluster to attach the simulation to (see
        ``python -m simulation.ray_cluster``); ``None`` starts a private Ray instance.
    output_dir : Path | None (default: None)
        Where the ServerApp writes ``model.pt``, ``metrics.json`` and its checkpoint; ``None``
        means a new folder under ``outputs/`` in the repository.
    timeout : float (default: 1800.0)
        Seconds before the run is stopped.
    echo : bool (default: True)
        Print Flower's log stream as it arrives.
    app_dir : Path (default: this repository)
        The Flower app to run.
    """
    if client_cpus < 1:
        raise ValueError(f"client_cpus must be a whole number of at least 1, got {client_cpus}.")
    if client_gpus < 0:
        raise ValueError(f"client_gpus must be 0 or more, got {client_gpus}.")
    if output_dir is None:
        output_dir = REPO_ROOT / "outputs" / time.strftime("%Y%m%d-%H%M%S")
    output_dir = Path(output_dir).resolve()
    federation: dict[str, Any] = {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": client_cpus,
        "client-resources-num-gpus": client_gpus,
    }
    if ray_address is None:
        federation["init-args-num-cpus"] = clients_at_once * client_cpus
    started = time.monotonic()
    for attempt in (1, 2):
        result = _launch_once(
            {**(run_config or {}), "output-dir": str(output_dir)},
            federation,
            ray_address=ray_address,
            output_dir=output_dir,
            timeout=timeout,
            echo=echo,
            app_dir=app_dir,
        )
        ray_missed_start = _RAY_START_FAILURE in result.log and not result.metrics
        if result.completed or not ray_missed_start or attempt == 2:
            break
        # Ray's fixed 30 s start-up deadline is sometimes missed on a loaded machine; nothing
        # has been trained yet, so starting again loses nothing.
        print("Ray did not start in time; starting the run again.", file=sys.stderr)
    result.seconds = time.monotonic() - started
    return result


def _launch_once(
    run_config: dict[str, Any],
    federation: dict[str, Any],
    *,
    ray_address: str | None,
    output_dir: Path,
    timeout: float,
    echo: bool,
    app_dir: Path,
) -> LaunchResult:
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="splitfed-flwr-home-"))
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_TMPDIR=str(home / "ray"),
        RAY_DEDUP_LOGS="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if ray_address is None:
        env.pop("RAY_ADDRESS", None)  # a private Ray instance, not one the shell points at
    else:
        env["RAY_ADDRESS"] = ray_address  # read by the simulation's ray.init()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink_log = home / "superlink.log"
    superlink_command = [
        str(bin_dir / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    with open(superlink_log, "wb") as log_file:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "simulation.processes", *superlink_command],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    lines: list[str] = []
    try:
        _wait_healthy(port, supervisor, superlink_log, timeout=60)
        status, details, run_id = _flwr_run(
            [
                str(app_dir),
                CONNECTION,
                "--stream",
                "--federation-config",
                _config_args(federation),
                "--run-config",
                _config_args(run_config),
            ],
            bin_dir=bin_dir,
            env=env,
            timeout=timeout,
            echo=echo,
            lines=lines,
        )
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(superlink_log, output_dir / "superlink.log")
        shutil.rmtree(home, ignore_errors=True)
    return LaunchResult(
        status=status,
        details=details,
        run_id=run_id,
        seconds=time.monotonic() - started,
        output_dir=output_dir,
        metrics=_read_metrics(output_dir),
        log="".join(lines),
    )


def _read_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """The per-round metrics the ServerApp wrote, by round; empty if it wrote none."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        return {}
    return {int(r): values for r, values in json.loads(metrics_file.read_text()).items()}


def _flwr_run(
    args: list[str],
    *,
    bin_dir: Path,
    env: dict[str, str],
    timeout: float,
    echo: bool,
    lines: list[str],
    connection: str = CONNECTION,
) -> tuple[str, str, int | None]:
    """Run ``flwr run ARGS...``, collect its output in ``lines``, and return how the run ended:
    ``(status, details, run_id)``. The run is stopped after ``timeout`` seconds."""
    flwr_run = subprocess.Popen(
        [str(bin_dir / "flwr"), "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=die_with_parent,
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
    status, details = _run_status(bin_dir, env, run_id, connection=connection)
    if timed_out.is_set():
        status, details = "timed-out", f"stopped after {timeout:.0f} s; {details}"
    return status, details, run_id


def _run_status(
    bin_dir: Path, env: dict[str, str], run_id: int | None, *, connection: str = CONNECTION
) -> tuple[str, str]:
    """Ask the SuperLink how the run ended (``flwr run`` exits 0 even when the ServerApp fails)."""
    if run_id is None:
        return "not-started", "flwr run did not start a run; see the output above"
    listing = subprocess.run(
        [str(bin_dir / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
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
    """The per-round table the launcher prints at the end."""
    columns = [
        ("round", 5),
        ("test acc", 8),
        ("test loss", 9),
        ("data plane", 10),
        ("model sync", 10),
    ]
    header = "  ".join(f"{name:>{width}}" for name, width in [*columns, ("seconds", 7)])
    rows = [header, "-" * len(header)]
    for server_round in sorted(metrics):
        m = metrics[server_round]
        rows.append(
            f"{server_round:>5}  {m.get('test-accuracy', float('nan')):>8.4f}  "
            f"{m.get('test-loss', float('nan')):>9.4f}  {m['data-plane-bytes'] / 1e6:>7.2f} MB  "
            f"{m['model-sync-bytes'] / 1e6:>7.2f} MB  {m['round-seconds']:>7.2f}"
        )
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
    print(f"Run {result.run_id}: {result.status} in {result.seconds:.1f} s")
    if not result.completed:
        print(result.details, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.launch",
        description="Run the SplitFed digits app with `flwr run` on Flower's simulation engine.",
    )
    parser.add_argument(
        "--num-supernodes", type=int, default=10, help="simulated clients (default: 10)"
    )
    parser.add_argument(
        "--clients-at-once",
        type=int,
        default=4,
        help="ClientApps running at the same time on the private Ray instance (default: 4)",
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="CPUs each ClientApp reserves (default: 1)"
    )
    parser.add_argument(
        "--client-gpus",
        type=float,
        default=0.0,
        help="GPUs each ClientApp reserves, e.g. 0.25 to share one GPU by four (default: 0)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="HOST:PORT of a running Ray cluster to run the clients on (default: a private one)",
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    result = run_app(
        run_config=parse_run_config(args.run_config),
        num_supernodes=args.num_supernodes,
        clients_at_once=args.clients_at_once,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        ray_address=args.ray_address,
        output_dir=args.output_dir,
        timeout=args.timeout,
        echo=not args.quiet,
    )
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
