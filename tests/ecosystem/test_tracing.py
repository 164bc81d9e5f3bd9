"""Traces leave the service over OTLP/gRPC (SPEC §10), as an operator's collector gets
them: a stand-in collector (grpcio with the opentelemetry-proto package's generated
TraceService) receives the spans of calls made with grpcurl and a W3C `traceparent`;
and with the collector down, the service answers a short h2load run in full, beside the
same run against a service without tracing.
"""

from __future__ import annotations

import secrets
import struct
import subprocess
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from support import SERVICE, Server, log_path, run
from testkit.local import eventually, free_port

TOKEN = "tracing-secret-token-5d1c"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with its resource's attributes."""

    def __init__(self):
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[dict, trace_pb2.Span]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.trace_id == trace_id]


def attributes(pairs) -> dict:
    """OTLP key-values as a plain dict of Python values."""
    found = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind) if kind else None
    return found


@pytest.fixture(scope="module")
def collector():
    service = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    service.endpoint = f"http://127.0.0.1:{port}"
    yield service
    server.stop(grace=None)


@pytest.fixture(scope="module")
def traced(start, collector) -> Server:
    server = start(Server("traced", "memory", ["--otlp-endpoint", collector.endpoint]))
    server.wait_for("SERVING")
    return server


def test_spans_join_the_callers_trace(traced, collector):
    """A Get sent with `traceparent` and `tracestate` is a server span of the caller's
    trace, a child of the caller's span, named and attributed by OpenTelemetry's RPC
    conventions, with the store's span under it; no attribute holds the token."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    done = run(["grpcurl", "-plaintext",
                "-H", f"traceparent: 00-{trace_id}-{parent_id}-01",
                "-H", "tracestate: caller=eco",
                "-d", f'{{"token":"{TOKEN}"}}', traced.address, f"{SERVICE}/Get"])
    assert done.returncode == 0, done.stderr
    assert "GET_OUTCOME_MISS" in done.stdout

    def exported():
        spans = collector.of_trace(bytes.fromhex(trace_id))
        names = {span.name for _, span in spans}
        return spans if {f"{SERVICE}/Get", "store.get"} <= names else None

    spans = eventually(15, exported, 0.2)
    assert spans, f"no Get and store spans of trace {trace_id} in 15 s: {collector.spans}"
    resource, server = next((r, s) for r, s in spans if s.name == f"{SERVICE}/Get")
    assert resource.get("service.name") == "session-cache"
    assert server.parent_span_id.hex() == parent_id
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server.trace_state == "caller=eco"
    assert attributes(server.attributes).items() >= {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Get",
        "rpc.grpc.status_code": 0,
        "outcome": "miss",
    }.items(), attributes(server.attributes)
    _, store = next((r, s) for r, s in spans if s.name == "store.get")
    assert store.parent_span_id == server.span_id
    assert store.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert attributes(store.attributes).get("db.system") == "memory"
    for _, span in spans:
        for value in attributes(span.attributes).values():
            assert TOKEN not in str(value), f"{span.name} exported the token"


def get_body(token: str) -> bytes:
    """A length-prefixed GetRequest, as h2load sends it."""
    message = b"\x0a" + bytes([len(token)]) + token.encode()
    return b"\x00" + struct.pack(">I", len(message)) + message


def h2load(server: Server, calls: int, body_path) -> dict:
    out = subprocess.run(
        ["h2load", "-n", str(calls), "-c", "4", "-m", "10", "-t", "1", "--data", str(body_path),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{server.address}/{SERVICE}/Get"],
        capture_output=True, text=True, timeout=120)
    print(out.stdout)
    figures = {}
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            figures["rps"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            figures["succeeded"] = int(line.split(",")[3].split()[0])
        elif line.startswith("status codes:"):
            figures["2xx"] = int(line.split(":")[1].split(",")[0].split()[0])
    return figures


def test_a_dead_collector_costs_callers_nothing(start, traced, tmp_path):
    """With --otlp-endpoint pointing where nothing listens, every call of a short h2load
    run is answered. The same run against the service with a live collector, and
    against one without tracing, is printed beside it, interleaved (the comparison is
    for the reader: timings are benchmarks' business, not a test's)."""
    dead = start(Server("dead-collector", "memory",
                        ["--otlp-endpoint", f"http://127.0.0.1:{free_port()}"]))
    plain = start(Server("untraced", "memory"))
    for server in (dead, plain):
        server.wait_for("SERVING")
    body = tmp_path / "get.bin"
    body.write_bytes(get_body(TOKEN))
    calls = 5_000
    runs = {}
    for server in (plain, traced, dead) * 2:
        runs.setdefault(server.name, []).append(h2load(server, calls, body))
    print({name: [r.get("rps") for r in results] for name, results in runs.items()})
    for name, results in runs.items():
        for figures in results:
            assert figures.get("succeeded") == calls, f"{name}: {figures}"
            assert figures.get("2xx") == calls, f"{name}: {figures}"
    assert dead.proc.poll() is None, f"died; log {log_path('server-dead-collector')}"
