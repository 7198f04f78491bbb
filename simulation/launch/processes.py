"""Start Flower's processes so that none outlives the launcher, however it ends.

Flower's SuperLink starts its executor in a new session, and the executor starts the simulation
process and a Ray cluster below it; killing one process group misses most of them, and orphans are
re-parented to init. So the SuperLink runs under a small supervisor (``python -m
simulation.launch.processes CMD...``) that makes itself a child subreaper, so every orphan of the
tree lands under it, and asks the kernel to signal it when the launcher dies. On SIGTERM, or on the
launcher's death, the supervisor terminates every descendant, waits, and kills what is left. Linux
only (``prctl``); elsewhere the supervisor still cleans up what it can see.

Children ask for the signal themselves, after ``exec`` (``python -m simulation.launch.processes
--exec PID CMD...`` for a command that cannot): a ``preexec_fn`` would make ``subprocess`` fork
rather than vfork, and in a process with gRPC's poller running, gRPC's fork handlers then crash
the child before it execs ("epoll_wait error: Bad file descriptor", grpc/grpc#43055).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = [
    "descendants",
    "die_with_parent",
    "free_port",
    "kill_descendants",
    "spawn_supervised",
    "stop_supervised",
    "supervise",
    "with_parent",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGTERM this process when its parent dies, even by SIGKILL; exit now if
    the parent, ``parent_pid``, died before the request could be made."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        sys.exit(f"the launcher (pid {parent_pid}) ended before this process started")


def with_parent(command: list[str]) -> list[str]:
    """``command`` run so that it gets SIGTERM when this process dies (see the module's
    docstring for why not through a ``preexec_fn``)."""
    # The file itself, not the module: it needs only the standard library, whatever the cwd.
    return [sys.executable, "-I", __file__, "--exec", str(os.getpid()), *command]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, however deep."""
    children, found, todo = _children_by_parent(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# Exit codes of the children reaped by ``_reap``: it also reaps the supervised command, whose
# ``Popen`` then no longer knows its exit code.
_exit_codes: dict[int, int] = {}


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _exit_codes[pid] = os.waitstatus_to_exitcode(status)


def kill_descendants(pid: int, *, grace: float = 5.0) -> None:
    """SIGTERM every descendant of ``pid``, wait up to ``grace`` seconds, then SIGKILL the rest."""
    for child in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not descendants(pid):
            return
        time.sleep(0.1)
    # Some (orphaned Ray agents among them) ignore SIGTERM.
    for child in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    time.sleep(0.2)
    _reap()


def supervise(command: list[str], *, parent_pid: int) -> int:
    """Run ``command`` and keep its whole process tree under this process until told to stop
    or until ``parent_pid``, the launcher, dies.

    Returns the command's exit code (a negative signal number if a signal ended it), or 0
    when it was told to stop.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    die_with_parent(parent_pid)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    child = subprocess.Popen(command, start_new_session=True)
    while not stop.wait(0.2):
        _reap()
        if child.poll() is not None and not descendants(os.getpid()):
            break
    kill_descendants(os.getpid())
    if stop.is_set():
        return 0
    child.poll()
    returncode = _exit_codes.get(child.pid, child.returncode)
    return returncode if returncode is not None else 0


def spawn_supervised(
    command: list[str], *, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` under a supervisor (see the module's docstring), its output to
    ``log_path``; return the supervisor, which exits with the command's exit code."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), *command],
            cwd=Path(__file__).resolve().parents[2],  # where `simulation` is importable
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def stop_supervised(supervisor: subprocess.Popen[bytes], *, grace: float = 30.0) -> None:
    """Ask a supervisor to stop its whole tree; kill it if it has not after ``grace`` seconds."""
    if supervisor.poll() is None:
        supervisor.send_signal(signal.SIGTERM)
    try:
        supervisor.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        supervisor.wait()


def _main(argv: list[str]) -> int:
    # [--exec] PARENT_PID COMMAND...: exec COMMAND, or supervise it, while PARENT_PID lives.
    if argv[0] == "--exec":
        die_with_parent(int(argv[1]))
        os.execvp(argv[2], argv[2:])
    return supervise(argv[1:], parent_pid=int(argv[0]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
