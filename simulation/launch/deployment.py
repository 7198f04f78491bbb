"""Run the app on Flower's deployment engine on this machine, with TLS and SuperNode authentication.

    python -m simulation.launch.deployment [--num-supernodes 2] [--run-config "num-server-rounds=5"]

:class:`LocalDeployment` does on loopback what a real deployment does across machines: it makes a
certificate authority and certificates (for the SuperLink and for the split server), starts a
``flower-superlink`` that serves TLS and admits only registered SuperNodes, makes an EC key pair
for each SuperNode, registers the public keys with ``flwr supernode register``, and starts the
``flower-supernode`` processes, each with its own data partition. :meth:`LocalDeployment.run` runs
the app with ``flwr run ... --stream`` over a connection that verifies the SuperLink with the CA
certificate, and returns a :class:`~simulation.launch.flwr_cli.LaunchResult`. Every process runs
under the supervisor of :mod:`simulation.launch.processes`, and leaving the ``with`` block stops
them all, also on failure or Ctrl-C.

Flower 1.41 serves the Fleet, Control and ServerAppIo APIs of the SuperLink on one HTTPS port
(``--host``/``--port``, default 8000); see ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .certificates import issue_certificate, make_certificates
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
from .processes import descendants, free_port, spawn_supervised, stop_supervised

__all__ = [
    "Certificates",
    "LocalDeployment",
    "SuperNodeKeys",
    "make_deployment_certificates",
    "make_supernode_keys",
    "run_app",
]

CONNECTION = "splitfed-deployment"


# --- certificates and keys -------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files of a private CA and the two server certificates it signed.

    ``ca_cert`` goes to every machine that verifies a server (SuperNodes' ``--root-certificates``,
    the ``root-certificates`` of a ``flwr`` connection, the ServerApp's
    ``split-server-ca-certfile``, which it ships to the clients); ``ca_key`` stays offline. The
    SuperLink serves ``superlink_cert`` and ``superlink_key``, the split server
    ``split_server_cert`` and ``split_server_key``.
    """

    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    split_server_cert: Path
    split_server_key: Path


def make_deployment_certificates(
    directory: Path,
    *,
    superlink_hosts: list[str] | None = None,
    split_server_hosts: list[str] | None = None,
    days: int = 30,
) -> Certificates:
    """Make a private CA and, signed by it, a SuperLink and a split-server certificate.

    Parameters
    ----------
    directory : Path
        Where the PEM files are written (created if missing): ``ca.crt``, ``ca.key``,
        ``server.crt`` and ``server.key`` (the SuperLink's), ``split-server.crt``,
        ``split-server.key``.
    superlink_hosts, split_server_hosts : list[str] | None (default: None)
        IP addresses and DNS names each server is dialled by, besides ``localhost`` and
        ``127.0.0.1`` (the certificate's SANs): the SuperLink's address that SuperNodes and
        ``flwr`` use; the host of ``split-server-advertised-address``.
    days : int (default: 30)
        How long the certificates are valid.
    """
    directory = Path(directory)
    superlink = make_certificates(directory, hosts=superlink_hosts, days=days)
    ca_key = directory / "ca.key"
    split_cert, split_key = issue_certificate(
        ca_certfile=superlink.ca_certfile,
        ca_keyfile=ca_key,
        certfile=directory / "split-server.crt",
        keyfile=directory / "split-server.key",
        hosts=split_server_hosts,
        common_name="flwr-splitfed split server",
        days=days,
    )
    return Certificates(
        ca_cert=superlink.ca_certfile,
        ca_key=ca_key,
        superlink_cert=superlink.certfile,
        superlink_key=superlink.keyfile,
        split_server_cert=split_cert,
        split_server_key=split_key,
    )


@dataclass(frozen=True)
class SuperNodeKeys:
    """A SuperNode's authentication key pair, in OpenSSH format (what Flower 1.41 reads).

    ``private_key`` stays on the SuperNode (``flower-supernode --auth-supernode-private-key``);
    ``public_key`` is registered with the SuperLink (``flwr supernode register``).
    """

    private_key: Path
    public_key: Path


def make_supernode_keys(directory: Path, name: str) -> SuperNodeKeys:
    """Make an EC (NIST P-384) key pair as ``DIRECTORY/NAME`` and ``DIRECTORY/NAME.pub``.

    The same as ``ssh-keygen -t ecdsa -b 384 -N "" -f DIRECTORY/NAME``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = SuperNodeKeys(private_key=directory / name, public_key=directory / f"{name}.pub")
    keys.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    keys.private_key.chmod(0o600)
    keys.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return keys


# --- the deployment ---------------------------------------------------------------------------


@dataclass
class _Process:
    name: str
    supervisor: subprocess.Popen
    log_path: Path


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, secured as a real deployment is; stopped on exit.

    Parameters
    ----------
    num_supernodes : int (default: 2)
        SuperNodes to start; SuperNode ``i`` gets ``--node-config "partition-id=i
        num-partitions=N"``.
    tls : bool (default: True)
        Serve the SuperLink's APIs over TLS with certificates of a private CA made here, and
        verify it with that CA from the SuperNodes and ``flwr``. ``False`` runs everything with
        ``--insecure`` (plaintext).
    supernode_auth : bool (default: True)
        Start the SuperLink with ``--enable-supernode-auth``, give each SuperNode a key pair and
        register its public key before it starts. Needs ``tls``.
    work_dir : Path | None (default: None)
        Where certificates, keys, ``FLWR_HOME`` folders and logs go; ``None`` makes a temporary
        folder that is removed on exit (logs are copied to a run's output folder first).
    echo : bool (default: False)
        Print the SuperLink and SuperNode logs' paths and progress lines.
    start_timeout : float (default: 60.0)
        Seconds to wait for the SuperLink to answer and for the SuperNodes to connect.

    Examples
    --------
    >>> with LocalDeployment(num_supernodes=2) as deployment:  # doctest: +SKIP
    ...     result = deployment.run(run_config={"num-server-rounds": 3})
    """

    def __init__(
        self,
        *,
        num_supernodes: int = 2,
        tls: bool = True,
        supernode_auth: bool = True,
        work_dir: Path | None = None,
        echo: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be at least 1, got {num_supernodes}.")
        if supernode_auth and not tls:
            raise ValueError(
                "supernode_auth=True needs tls=True: Flower refuses SuperNode authentication "
                "over plaintext. Pass tls=True, or supernode_auth=False for a plaintext test."
            )
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.echo = echo
        self.start_timeout = start_timeout
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self._processes: list[_Process] = []
        self.certificates: Certificates | None = None
        self.supernode_keys: list[SuperNodeKeys] = []
        self.port = 0
        self.bin_dir = Path(sys.executable).parent

    # -- lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="splitfed-deployment-"))
        self.work_dir = self.work_dir.resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.home = self.work_dir / "flwr-home"
        self.logs = self.work_dir / "logs"
        self.home.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.port = free_port()
        if self.tls:
            self.certificates = make_deployment_certificates(self.work_dir / "certs")
        self._write_connection()
        self._start_superlink()
        if self.supernode_auth:
            for i in range(self.num_supernodes):
                keys = make_supernode_keys(self.work_dir / "keys", f"supernode-{i}")
                self.register(keys.public_key)
                self.supernode_keys.append(keys)
        for i in range(self.num_supernodes):
            self.start_supernode(
                partition_id=i,
                private_key=self.supernode_keys[i].private_key if self.supernode_auth else None,
            )
        self.wait_for_supernodes(self.num_supernodes)

    def stop(self) -> None:
        """Stop every process this deployment started (SuperNodes first, then the SuperLink)."""
        for process in reversed(self._processes):
            stop_supervised(process.supervisor)
        self._processes.clear()
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- environment

    @property
    def superlink_address(self) -> str:
        """``HOST:PORT`` of the SuperLink's (Fleet, Control and ServerAppIo) API."""
        return f"127.0.0.1:{self.port}"

    def env(self, home: Path | None = None) -> dict[str, str]:
        """The environment of Flower's processes, with ``FLWR_HOME`` set to ``home``."""
        env = flower_env(home or self.home)
        for name in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "RAY_ADDRESS"):
            env.pop(name, None)
        return env

    def _write_connection(self) -> None:
        security = (
            f'root-certificates = "{self.certificates.ca_cert}"\n'
            if self.certificates
            else "insecure = true\n"
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.superlink_address}"\n{security}'
        )

    def _tls_args(self) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certificates.ca_cert),
            "--ssl-certfile",
            str(self.certificates.superlink_cert),
            "--ssl-keyfile",
            str(self.certificates.superlink_key),
        ]

    def _spawn(self, name: str, command: list[str], *, home: Path) -> _Process:
        log_path = self.logs / f"{name}.log"
        supervisor = spawn_supervised(command, env=self.env(home), log_path=log_path)
        process = _Process(name=name, supervisor=supervisor, log_path=log_path)
        self._processes.append(process)
        if self.echo:
            print(f"started {name} (log: {log_path})", flush=True)
        return process

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "flwr"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- processes

    def _start_superlink(self) -> None:
        command = [
            str(self.bin_dir / "flower-superlink"),
            *self._tls_args(),
            *(["--enable-supernode-auth"] if self.supernode_auth else []),
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        superlink = self._spawn("superlink", command, home=self.home)
        context = (
            ssl.create_default_context(cafile=str(self.certificates.ca_cert))
            if self.certificates
            else None
        )
        wait_healthy(
            self.port, superlink.supervisor, superlink.log_path, self.start_timeout, tls=context
        )

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink; return its node ID."""
        reply = self._flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            return int(json.loads(reply.stdout)["node-id"])
        except (ValueError, KeyError) as err:
            raise RuntimeError(
                f"flwr supernode register {public_key} failed:\n{reply.stdout}{reply.stderr}"
            ) from err

    def start_supernode(
        self,
        *,
        partition_id: int,
        private_key: Path | None = None,
        insecure: bool = False,
        num_partitions: int | None = None,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        """Start a ``flower-supernode`` with its own ClientAppIo port and ``FLWR_HOME``.

        Parameters
        ----------
        partition_id : int
            The data partition it trains on.
        private_key : Path | None (default: None)
            Its authentication key (``--auth-supernode-private-key``); ``None`` starts it
            without one.
        insecure : bool (default: False)
            Dial the SuperLink in plaintext (``--insecure``) even if it serves TLS.
        num_partitions : int | None (default: None)
            Partitions of the data; ``None`` means the deployment's ``num_supernodes``.
        name : str | None (default: None)
            Name of its log and home folder; ``None`` means ``supernode-PARTITION_ID``.
        extra_args : tuple[str, ...] (default: ())
            More ``flower-supernode`` flags, e.g. ``("--max-retries", "1")``.

        Returns
        -------
        subprocess.Popen
            Its supervisor, which exits with the SuperNode's exit code.
        """
        name = name or f"supernode-{partition_id}"
        home = self.work_dir / name
        home.mkdir(exist_ok=True)
        num_partitions = num_partitions or self.num_supernodes
        if insecure or self.certificates is None:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.certificates.ca_cert)]
        command = [
            str(self.bin_dir / "flower-supernode"),
            *security,
            "--superlink",
            self.superlink_address,
            *(["--auth-supernode-private-key", str(private_key)] if private_key else []),
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            *extra_args,
        ]
        return self._spawn(name, command, home=home).supervisor

    def supernodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``)."""
        reply = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return json.loads(reply.stdout)["nodes"]
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"flwr supernode ls failed:\n{reply.stdout}{reply.stderr}") from err

    def online_supernodes(self) -> list[dict[str, Any]]:
        """The SuperNodes connected now."""
        return [node for node in self.supernodes() if node.get("status") == "online"]

    def wait_for_supernodes(self, count: int) -> None:
        """Wait until ``count`` SuperNodes are connected; fail early if one exits."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.supervisor.poll() is not None:
                    raise RuntimeError(
                        f"{process.name} exited with code {process.supervisor.returncode}; "
                        f"its log: {process.log_path}\n{self.log_tail(process.name)}"
                    )
            if len(self.online_supernodes()) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"{count} SuperNodes were not connected after {self.start_timeout:.0f} s; "
            f"the SuperLink lists {self.supernodes()}; logs in {self.logs}"
        )

    def process_ids(self, name: str) -> set[int]:
        """The processes running under ``name`` now (``supernode-0``: the SuperNode and the
        ClientApp process it started for the current message)."""
        return {
            pid
            for process in self._processes
            if process.name == name
            for pid in descendants(process.supervisor.pid)
        }

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a process's log (``superlink``, ``supernode-0``, ...)."""
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "".join(text.splitlines(keepends=True)[-lines:])

    # -- running the app

    def split_server_run_config(self) -> dict[str, Any]:
        """Run-config keys that make the split server serve TLS with this deployment's CA."""
        if self.certificates is None:
            return {"split-server-insecure": True}
        return {
            "split-server-insecure": False,
            "split-server-certfile": str(self.certificates.split_server_cert),
            "split-server-keyfile": str(self.certificates.split_server_key),
            "split-server-ca-certfile": str(self.certificates.ca_cert),
        }

    def run(
        self,
        *,
        run_config: dict[str, Any] | None = None,
        output_dir: Path | None = None,
        timeout: float = 1800.0,
        echo: bool = True,
        app_dir: Path = APP_DIR,
    ) -> LaunchResult:
        """Run the Flower app in ``app_dir`` with ``flwr run`` and wait for it to end.

        Parameters
        ----------
        run_config : dict[str, Any] | None (default: None)
            Run-config overrides (``--run-config``); the split server's TLS keys and
            ``output-dir`` are added.
        output_dir : Path | None (default: None)
            Where the ServerApp writes ``model.pt``, ``metrics.json`` and ``metrics.png``, and
            where the processes' logs are copied; ``None`` means a new folder under
            ``./outputs/``.
        timeout : float (default: 1800.0)
            Seconds before the run is stopped.
        echo : bool (default: True)
            Print Flower's log stream as it arrives.
        app_dir : Path (default: this repository)
            The Flower app to run.
        """
        if output_dir is None:
            output_dir = default_output_dir()
        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        # The split server's TLS keys, for apps that have them (this repository's app does).
        keys = app_config_keys(app_dir)
        split_server = self.split_server_run_config() if "split-server-insecure" in keys else {}
        config = {**split_server, **(run_config or {}), **app_output_dir(keys, output_dir)}
        started = time.monotonic()
        lines: list[str] = []
        try:
            status, details, run_id = flwr_run(
                [str(app_dir), CONNECTION, "--stream", "--run-config", config_args(config)],
                env=self.env(),
                timeout=timeout,
                echo=echo,
                lines=lines,
                connection=CONNECTION,
            )
        finally:
            for process in self._processes:
                shutil.copy(process.log_path, output_dir / process.log_path.name)
        return LaunchResult(
            status=status,
            details=details,
            run_id=run_id,
            seconds=time.monotonic() - started,
            output_dir=output_dir,
            metrics=read_metrics(output_dir),
            log="".join(lines),
        )


def run_app(
    *,
    run_config: dict[str, Any] | None = None,
    num_supernodes: int = 2,
    tls: bool = True,
    supernode_auth: bool = True,
    output_dir: Path | None = None,
    work_dir: Path | None = None,
    timeout: float = 1800.0,
    echo: bool = True,
    app_dir: Path = APP_DIR,
) -> LaunchResult:
    """Start a :class:`LocalDeployment`, run the app on it, stop it, and return how the run ended.

    Parameters are those of :class:`LocalDeployment` and :meth:`LocalDeployment.run`.
    ``LaunchResult.seconds`` includes starting the deployment.
    """
    started = time.monotonic()
    with LocalDeployment(
        num_supernodes=num_supernodes,
        tls=tls,
        supernode_auth=supernode_auth,
        work_dir=work_dir,
        echo=echo,
    ) as deployment:
        result = deployment.run(
            run_config=run_config,
            output_dir=output_dir,
            timeout=timeout,
            echo=echo,
            app_dir=app_dir,
        )
    result.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.launch.deployment",
        description=(
            "Run the SplitFed digits app with `flwr run` on Flower's deployment engine on this "
            "machine: a SuperLink and SuperNodes with TLS and SuperNode authentication."
        ),
    )
    parser.add_argument("--num-supernodes", type=int, default=2, help="SuperNodes (default: 2)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (plaintext, for comparison)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep certificates, keys and logs here (default: a temporary folder)",
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    result = run_app(
        run_config=parse_run_config(args.run_config),
        num_supernodes=args.num_supernodes,
        tls=not args.insecure,
        supernode_auth=not args.insecure,
        output_dir=args.output_dir,
        work_dir=args.work_dir,
        timeout=args.timeout,
        echo=not args.quiet,
    )
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
