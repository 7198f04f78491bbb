"""A Ray cluster of several nodes on this machine, to run the simulation attached to a cluster.

    python -m simulation.launch.ray_cluster --nodes 3 --cpus-per-node 1

starts a head node and two more nodes (each its own ``ray start`` with its own resources), prints
the head's address, and stops them all on Ctrl-C. Run the app on it with

    python -m simulation.launch --ray-address <that address>

which is what a lab does with its own cluster: only the address changes. Each node runs under the
supervisor of :mod:`simulation.launch.processes`, so stopping it stops every Ray process it
started, and the cluster keeps its files (and its ``ray_current_cluster`` marker) in a temp folder
of its own, so a cluster that was killed never confuses a later ``ray.init()``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .processes import descendants, free_port, spawn_supervised, stop_supervised

__all__ = ["LocalRayCluster", "RayNode"]

logger = logging.getLogger("flwr_splitfed")

_STARTED = "Ray runtime started"


@dataclass(frozen=True)
class RayNode:
    """The resources one node of the cluster offers.

    Parameters
    ----------
    num_cpus : int (default: 1)
        CPUs the node offers to Ray tasks and actors.
    num_gpus : int (default: 0)
        GPUs the node offers.
    resources : dict[str, float] (default: {})
        Custom resources, e.g. ``{"hospital-a": 1}``, to pin ClientApps to nodes.
    """

    num_cpus: int = 1
    num_gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)

    def ray_start_args(self) -> list[str]:
        args = ["--num-cpus", str(self.num_cpus), "--num-gpus", str(self.num_gpus)]
        if self.resources:
            args += ["--resources", json.dumps(self.resources)]
        return args


class LocalRayCluster:
    """Start a head node and more nodes with ``ray start``; stop them all on exit.

    Parameters
    ----------
    nodes : Sequence[RayNode]
        The head node first, then the others. At least one.
    start_timeout : float (default: 120.0)
        Seconds to wait for every node to join before giving up.
    attempts : int (default: 2)
        Times to try starting the cluster. Ray gives a node 30 s to register with its control
        store, which a loaded two-core machine sometimes misses; a second try usually succeeds.
    """

    def __init__(
        self,
        nodes: Sequence[RayNode],
        *,
        start_timeout: float = 120.0,
        attempts: int = 2,
    ) -> None:
        if not nodes:
            raise ValueError(
                "A Ray cluster needs at least one node (the head); pass nodes=[RayNode()]."
            )
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}.")
        self.nodes = list(nodes)
        self.start_timeout = start_timeout
        self.attempts = attempts
        self.address = ""
        self._supervisors: list[subprocess.Popen] = []
        self._temp_dir: Path | None = None

    def start(self) -> str:
        """Start every node and wait until all have joined; returns the head's address."""
        for attempt in range(1, self.attempts + 1):
            try:
                self._start_once()
                return self.address
            except (RuntimeError, TimeoutError) as error:
                self.stop()
                if attempt == self.attempts:
                    raise
                logger.warning("Ray cluster did not start (%s); trying again.", error)
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        # Unix sockets live under the temp dir, and their paths must stay under 108 bytes.
        self._temp_dir = Path(tempfile.mkdtemp(prefix="sfray-", dir="/tmp"))
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        head, *others = self.nodes
        self._start_node(
            "head",
            ["--head", "--port", str(port), "--include-dashboard", "false", *head.ray_start_args()],
        )
        for index, node in enumerate(others, start=1):
            self._start_node(f"node{index}", ["--address", self.address, *node.ray_start_args()])
        self._wait_for_nodes(len(self.nodes))

    def _start_node(self, name: str, args: list[str]) -> None:
        assert self._temp_dir is not None
        log_path = self._temp_dir / f"{name}.log"
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            *args,
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(self._temp_dir),
            "--disable-usage-stats",
            "--block",
        ]
        supervisor = spawn_supervised(command, env=dict(os.environ), log_path=log_path)
        self._supervisors.append(supervisor)
        deadline = time.monotonic() + self.start_timeout
        while _STARTED not in log_path.read_text(errors="replace"):
            if supervisor.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"Ray {name} node did not start; the end of its log:\n{tail}")
            time.sleep(0.2)

    def _wait_for_nodes(self, expected: int) -> None:
        probe = (
            "import sys, time, ray\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {self.start_timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {expected}:\n"
            "    if time.monotonic() > deadline:\n"
            "        sys.exit(1)\n"
            "    time.sleep(0.2)\n"
        )
        joined = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=self.start_timeout + 60,
        )
        if joined.returncode != 0:
            raise TimeoutError(
                f"not all {expected} Ray nodes joined {self.address}: {joined.stderr[-1500:]}"
            )

    def process_ids_by_node(self) -> list[set[int]]:
        """The processes each node runs now (raylet, workers, actors), head first."""
        return [descendants(supervisor.pid) for supervisor in self._supervisors]

    def stop(self) -> None:
        """Stop every node this cluster started and remove its temp folder."""
        for supervisor in self._supervisors:
            supervisor.send_signal(signal.SIGTERM)
        for supervisor in self._supervisors:
            stop_supervised(supervisor)
        self._supervisors.clear()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.launch.ray_cluster",
        description="Start a Ray cluster of several nodes on this machine; Ctrl-C stops it.",
    )
    parser.add_argument("--nodes", type=int, default=2, help="nodes, head included (default: 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="default: 1")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="default: 0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    node = RayNode(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)
    with LocalRayCluster([node] * args.nodes) as cluster:
        print(f"Ray cluster of {args.nodes} nodes at {cluster.address}", flush=True)
        print(f"Run the app on it: python -m simulation.launch --ray-address {cluster.address}")
        print("Ctrl-C stops every node.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
