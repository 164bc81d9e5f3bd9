"""What the ecosystem tests share: redis-server and session-cache on free loopback ports
(stopped by process id), the clients' command lines, and small helpers.

The binary is target/debug/session-cache (scripts/ecosystem-test.sh builds it first);
logs go to target/ecosystem/logs. redis-server must be on PATH, grpcurl too (the venv).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SESSION_CACHE_BIN", ROOT / "target" / "debug" / "session-cache"))
WORK = ROOT / "target" / "ecosystem"
LOGS = WORK / "logs"
PY_CLIENTS = ROOT / "examples" / "clients" / "python"
NODE_CLIENTS = ROOT / "examples" / "clients" / "node"
SERVICE = "sessioncache.v1.SessionCache"
STORES = ("memory", "redis")


def free_port() -> int:
    """A port free on loopback now (the kernel's pick; nothing holds it afterwards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(deadline_s: float, probe: Callable[[], object], every_s: float = 0.1) -> object:
    """Calls `probe` until it returns something truthy or `deadline_s` passes; returns
    its last answer either way."""
    end = time.monotonic() + deadline_s
    while True:
        answer = probe()
        if answer or time.monotonic() >= end:
            return answer
        time.sleep(every_s)


def stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: by process id, never by name."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_path(name: str) -> Path:
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS / f"{name}.out"


@dataclass
class Redis:
    """A redis-server of our own on a free loopback port, nothing persisted."""

    name: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Redis:
        directory = WORK / "redis" / self.name
        directory.mkdir(parents=True, exist_ok=True)
        with log_path(f"redis-{self.name}").open("w") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--maxmemory-policy", "noeviction"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        if not eventually(5, self.answers):
            self.stop()
            pytest.fail(f"redis-server did not answer PING on {self.port}: "
                        + log_path(f"redis-{self.name}").read_text())
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            stop_process(self.proc)


@dataclass
class Server:
    """session-cache on free loopback ports (gRPC and metrics)."""

    name: str
    store: str
    flags: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        if not BIN.is_file():
            pytest.fail(f"no {BIN}: build it first (cargo build --bin session-cache)")
        with log_path(f"server-{self.name}").open("w") as log:
            self.proc = subprocess.Popen(
                [str(BIN), "--listen", self.address,
                 "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *self.flags],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        return self

    def health(self, service: str = SERVICE) -> str:
        """grpc.health.v1 Check of `service`: SERVING, NOT_SERVING, or the error."""
        try:
            with grpc.insecure_channel(self.address) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"

    def wait_for(self, status: str, deadline_s: float = 10) -> None:
        seen = eventually(deadline_s, lambda: (s := self.health()) == status and s, 0.2)
        if not seen:
            pytest.fail(f"{self.name} server not {status} after {deadline_s}s: {self.health()}; "
                        f"log {log_path(f'server-{self.name}')}")

    def scrape(self) -> str:
        """The Prometheus text of GET /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.read().decode()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=5)


def run(argv: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Runs a client, prints what it said (pytest shows it on failure), and returns."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    print(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return done


def python_client(*args: str) -> list[str]:
    return [sys.executable, str(PY_CLIENTS / "client.py"), *args]


def node_client(*args: str) -> list[str]:
    return ["node", str(NODE_CLIENTS / "client.js"), *args]


def grpcurl(address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    """grpcurl -plaintext through server reflection (no .proto files), printing what it said."""
    argv = ["grpcurl", "-plaintext", "-max-time", "10"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    done = subprocess.run([*argv, address, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    print("$", " ".join(argv), address, *args, "\n", done.stdout, done.stderr)
    return done
