"""Processes on the loopback interface: free ports, bounded waits for a condition, a
Redis that answers as the process that was started, and stopping by process id (never
by name).

Run as a program for shell scripts (with tests/ on PYTHONPATH):
    python3 -m testkit.local free-port
    python3 -m testkit.local wait-port PORT
    python3 -m testkit.local wait-redis PORT PID
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# The pause between two looks at a condition.
POLL_S = 0.02


def free_port() -> int:
    """A port free on loopback now (the kernel's pick; nothing holds it afterwards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port(attempts: int = 200) -> int:
    """A free port below 55536 whose Redis Cluster bus port (+10000) is free too."""
    for _ in range(attempts):
        port = free_port()
        if port >= 55536:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port pair for a cluster node in {attempts} attempts")


def eventually(deadline_s: float, probe: Callable[[], T], every_s: float = POLL_S) -> T:
    """Calls `probe` until it returns something truthy or `deadline_s` passes; returns
    its last answer either way, for the caller to assert on or report."""
    end = time.monotonic() + deadline_s
    while True:
        answer = probe()
        if answer or time.monotonic() >= end:
            return answer
        time.sleep(every_s)


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback `port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_port(port: int, deadline_s: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Waits until loopback `port` accepts connections; with `proc`, fails at once if
    that process exits first."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        return accepts(port)

    if not eventually(deadline_s, ready):
        raise TimeoutError(f"nothing listened on {port} within {deadline_s} s")


def redis_info(port: int, section: str = "server") -> dict[str, str]:
    """`INFO section` of the Redis on loopback `port` as a dict ({} if none answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"INFO {section}\r\n".encode())
            reply = b""
            while b"\r\n" not in reply or len(reply) < _bulk_end(reply):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return {}
    if not reply.startswith(b"$"):
        return {}
    text = reply.split(b"\r\n", 1)[1].decode(errors="replace")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _bulk_end(reply: bytes) -> int:
    """Where a RESP bulk string `$<len>\\r\\n<data>\\r\\n` ends (0 if not one)."""
    if not reply.startswith(b"$"):
        return 0
    header, _, _ = reply.partition(b"\r\n")
    return len(header) + 2 + int(header[1:]) + 2


def wait_redis(port: int, proc: subprocess.Popen | int, deadline_s: float = 10.0) -> None:
    """Waits until the Redis on `port` is `proc` (a child, or a process id) itself,
    `INFO server`'s process_id: not another program's server on a port that was free a
    moment ago. Fails at once if the process ends first."""
    pid = proc if isinstance(proc, int) else proc.pid

    def answers_as_itself() -> bool:
        if not running(proc):
            raise RuntimeError(f"redis-server (pid {pid}) on {port} exited")
        return redis_info(port).get("process_id") == str(pid)

    if not eventually(deadline_s, answers_as_itself):
        raise TimeoutError(f"redis-server (pid {pid}) did not answer on {port} within {deadline_s} s")


def running(proc: subprocess.Popen | int) -> bool:
    """Whether a child (reaped if it ended) or a process id still runs."""
    if not isinstance(proc, int):
        return proc.poll() is None
    try:
        os.kill(proc, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    return True


def stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: by process id, never by name."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    if argv[:1] == ["free-port"]:
        print(free_port())
        return 0
    if argv[:1] == ["wait-port"] and len(argv) == 2:
        wait_port(int(argv[1]))
        return 0
    if argv[:1] == ["wait-redis"] and len(argv) == 3:
        wait_redis(int(argv[1]), int(argv[2]))
        return 0
    print("usage: python3 -m testkit.local free-port | wait-port PORT | wait-redis PORT PID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
