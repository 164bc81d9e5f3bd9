"""What the ecosystem tests share: redis-server and session-cache on free loopback ports
(stopped by process id), and the clients' command lines. Ports, waits and stopping come
from testkit (tests/testkit), which the benchmarks share.

The binary is target/debug/session-cache (scripts/ecosystem-test.sh builds it first);
logs go to target/ecosystem/logs. redis-server must be on PATH, grpcurl too (the venv).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testkit.local import eventually, free_port, stop_process, wait_redis

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SESSION_CACHE_BIN", ROOT / "target" / "debug" / "session-cache"))
WORK = ROOT / "target" / "ecosystem"
LOGS = WORK / "logs"
PY_CLIENTS = ROOT / "examples" / "clients" / "python"
NODE_CLIENTS = ROOT / "examples" / "clients" / "node"
SERVICE = "sessioncache.v1.SessionCache"
STORES = ("memory", "redis")


def log_path(name: str) -> Path:
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS / f"{name}.out"


def spawn(argv: list[str], log_name: str) -> subprocess.Popen:
    """`argv` started with its output in log_path(log_name)."""
    with log_path(log_name).open("w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


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
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(directory), "--maxmemory-policy", "noeviction"],
                          f"redis-{self.name}")
        try:
            wait_redis(self.port, self.proc, deadline_s=5)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            pytest.fail(f"{err}: " + log_path(f"redis-{self.name}").read_text())
        return self

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
        self.proc = spawn([str(BIN), "--listen", self.address,
                           "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *self.flags],
                          f"server-{self.name}")
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


# Back-channel logout (SPEC §12): the audience the service is told.
AUDIENCE = "session-cache"
