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
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .flwr_cli import (
    APP_DIR,
    LaunchResult,
    add_run_arguments,
    app_config_keys,
    app_output_dir,
    config_args,
    default_output_dir,
    flower_env,
    flwr_run,
    parse_run_config,
    read_metrics,
    report,
    wait_healthy,
)
from .processes import free_port, spawn_supervised, stop_supervised

__all__ = ["run_app"]

CONNECTION = "splitfed-simulation"


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
    app_dir: Path = APP_DIR,
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
        ``python -m simulation.launch.ray_cluster``); ``None`` starts a private Ray instance.
    output_dir : Path | None (default: None)
        Where the ServerApp writes ``model.pt``, ``metrics.json``, ``metrics.png`` and its
        checkpoint; ``None`` means a new folder under ``./outputs/``.
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
        output_dir = default_output_dir()
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
            {**(run_config or {}), **app_output_dir(app_config_keys(app_dir), output_dir)},
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
    env = flower_env(home, RAY_TMPDIR=str(home / "ray"), RAY_DEDUP_LOGS="0")
    if ray_address is None:
        env.pop("RAY_ADDRESS", None)  # a private Ray instance, not one the shell points at
    else:
        env["RAY_ADDRESS"] = ray_address  # read by the simulation's ray.init()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink_log = home / "superlink.log"
    superlink = spawn_supervised(
        [
            str(Path(sys.executable).parent / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        log_path=superlink_log,
    )
    lines: list[str] = []
    try:
        wait_healthy(port, superlink, superlink_log, timeout=60)
        status, details, run_id = flwr_run(
            [
                str(app_dir),
                CONNECTION,
                "--stream",
                "--federation-config",
                config_args(federation),
                "--run-config",
                config_args(run_config),
            ],
            env=env,
            timeout=timeout,
            echo=echo,
            lines=lines,
            connection=CONNECTION,
        )
    finally:
        stop_supervised(superlink)
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(superlink_log, output_dir / "superlink.log")
        shutil.rmtree(home, ignore_errors=True)
    return LaunchResult(
        status=status,
        details=details,
        run_id=run_id,
        seconds=time.monotonic() - started,
        output_dir=output_dir,
        metrics=read_metrics(output_dir),
        log="".join(lines),
    )


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
