#!/usr/bin/env python3
"""Measures session-cache beside its floors, in one run, with one load generator.

Floors: a constant-reply server for the same proto (examples/constant_server.rs), and
redis-benchmark GET/SET. Subjects: the service on one Redis, on a Redis Cluster of three
primaries, and on the memory store (Get hit, Validate hit, Get miss, Set, InvalidateUser),
with a stand-in Appwrite behind Validate (asked once per store, to warm the cache), at 500 calls
in flight (50 connections x 10 streams) and at 1. Beside them, a seed-equivalent: what the
Python service does per lookup (two GETs and a JSON parse with redis-py), for the same
number of lookups.

h2load counts any HTTP 200 as a success, gRPC errors included, so each subject is checked
twice: a sample call through curl must decode to the expected outcome, and the bytes per
reply under load must equal the sample's.

Each row runs `--pairs` times (3 by default), alternating with the floor at the same load,
so that the host's drift within a run hits both alike: the row gives each figure's median,
and its ratios against the floor are the medians of the pairs' ratios.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time

# testkit (tests/testkit): what the benchmarks share with the ecosystem tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from testkit.appwrite import AppwriteStandIn
from testkit.local import eventually, free_cluster_port, free_port, wait_port, wait_redis
from testkit.measure import cpu_seconds, quantiles, rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
SERVICE = "sessioncache.v1.SessionCache"
HEALTH = "grpc.health.v1.Health"


# --- protobuf, by hand: the messages are small and fixed ---------------------------

def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def timestamp(seconds):
    return field_varint(1, seconds)


def user(user_id):
    return b"".join([
        field_bytes(1, user_id.encode()),
        field_bytes(2, f"{user_id}@example.com".encode()),
        field_bytes(3, b"Bench User"),
        field_varint(4, 1),
        field_bytes(5, b"pro"),
        field_bytes(6, timestamp(1_705_314_600)),
        field_bytes(7, timestamp(1_705_314_600)),
    ])


def frame(message):
    return b"\x00" + struct.pack(">I", len(message)) + message


def get_request(token):
    return frame(field_bytes(1, token.encode()))


def set_request(token, user_id):
    return frame(field_bytes(1, token.encode()) + field_bytes(2, user(user_id))
                 + field_bytes(3, timestamp(4_102_444_800)))


def validate_request(token):
    return frame(field_bytes(1, token.encode()))


# --- the load's keys: spread over a Cluster's primaries --------------------------------

# A load at 500 in flight runs as this many h2load processes, each with its own token, so
# that on a Cluster of three primaries it reads entries (and markers) of every primary at
# once, two tokens each: per-node batching is what it measures, not one slot. Every store
# and the floor get the same shape.
SPREAD = 6
PRIMARIES = 3


def crc16(data):
    """CRC16/XMODEM, Redis Cluster's key hash."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key):
    """The Cluster slot of `key`, its hash tag's when it has one."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16(raw) % 16384


def primary_of(key, primaries=PRIMARIES):
    """Which of `primaries` serves `key` when `redis-cli --cluster create` has split the
    slots evenly between them (as start_cluster does): 0, 1, 2."""
    return key_slot(key) * primaries // 16384


def entry_key(token):
    return "session_cache:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def spread(prefix, key_of, count=SPREAD):
    """`count` names `{prefix}{n}` (of one length) whose keys (`key_of`) fall on every
    primary in turn."""
    names, n = [], 0
    while len(names) < count:
        name = f"{prefix}{n:03d}"
        if primary_of(key_of(name)) == len(names) % PRIMARIES:
            names.append(name)
        n += 1
    return names


# Tokens and users of the load: entries on every primary, and each token's user's marker
# on the primary after its entry's, so that a hit reads two nodes, as most do.
def users_after(prefix):
    """Users whose markers fall on the primary after each spread token's entry."""
    users = spread(prefix, lambda user: "user_invalidated:" + user)
    return users[1:] + users[:1]


TOKENS = spread("bench-token-", entry_key)
USERS = users_after("bench-user-")
VALIDATE_TOKENS = spread("bench-validate-token-", entry_key)
VALIDATE_USERS = users_after("bench-vuser-")
# What nginx's auth_request sends /auth for a request: a user's token, the original URI.
AUTH_HEADERS = (f"authorization: Bearer {VALIDATE_TOKENS[0]}", "x-original-uri: /orders")


def start_appwrite_stand_in():
    """The provider behind the Validate scenario: it vouches for each of VALIDATE_TOKENS
    once per store, to warm the cache, then is never asked while Validate hits."""
    stand_in = AppwriteStandIn(project="bench").start()
    for token, user_id in zip(VALIDATE_TOKENS, VALIDATE_USERS):
        stand_in.add_session(token, user_id, email=f"{user_id}@example.com",
                             name="Bench User", expire="2099-01-01T00:00:00Z")
    return stand_in


def invalidate_user_request(user_id):
    return frame(field_bytes(1, user_id.encode()))


CHECK = "envoy.service.auth.v3.Authorization/Check"


def check_request(token):
    """Envoy's CheckRequest as its HTTP filter sends it: attributes (1) > request (4) >
    http (2) > method (2), headers (3, a map entry: key 1, value 2), path (4), host (5)."""
    def header(key, value):
        return field_bytes(3, field_bytes(1, key.encode()) + field_bytes(2, value.encode()))
    http = b"".join([
        field_bytes(2, b"GET"),
        header("authorization", f"Bearer {token}"),
        header("accept", "application/json"),
        header("user-agent", "bench"),
        field_bytes(4, b"/orders"),
        field_bytes(5, b"shop.example.com"),
    ])
    return frame(field_bytes(1, field_bytes(4, field_bytes(2, http))))


def check_allowed(reply):
    """Whether a framed CheckResponse carries an ok_response (field 3) and no
    denied_response (field 2), by walking its top-level fields (all length-delimited)."""
    body, at, fields = reply[5:], 0, set()
    while at < len(body):
        tag, at = body[at], at + 1
        length = shift = 0
        while True:
            byte, at = body[at], at + 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if tag & 7 != 2:
            return False
        fields.add(tag >> 3)
        at += length
    return 3 in fields and 2 not in fields


def first_varint_field(reply):
    """The outcome (field 1) of a framed reply, or None."""
    if len(reply) < 5:
        return None
    body = reply[5:]
    if not body or body[0] != 0x08:
        return 0  # proto3 omits a zero outcome; no outcome is UNSPECIFIED
    return body[1]


# --- processes ---------------------------------------------------------------------

class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, check=True).stdout


def redis_cpu_seconds(ports):
    total = 0.0
    for port in ports:
        info = redis_cli(port, "info", "cpu")
        values = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        total += float(values["used_cpu_sys"]) + float(values["used_cpu_user"])
    return total


def redis_io(ports):
    """Commands Redis has run and socket reads it has made, summed over `ports`."""
    commands = reads = 0
    for port in ports:
        info = redis_cli(port, "info", "stats")
        values = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        commands += int(values["total_commands_processed"])
        reads += int(values["total_reads_processed"])
    return commands, reads


def start_redis(procs, workdir, *extra):
    """A redis-server of the run's own on a free loopback port, without persistence;
    returns its port once it answers as itself."""
    port = free_port()
    proc = procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", workdir, *extra])
    wait_redis(port, proc)
    return port


def start_cluster(procs, workdir, primaries=3):
    """Three cluster-enabled redis-servers joined by redis-cli; returns their ports once
    every node says cluster_state:ok."""
    ports = [free_cluster_port() for _ in range(primaries)]
    nodes = [procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", workdir,
                          "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                          "--cluster-node-timeout", "5000"])
             for port in ports]
    for port, proc in zip(ports, nodes):
        wait_redis(port, proc)
    subprocess.run(["redis-cli", "--cluster", "create",
                    *[f"127.0.0.1:{port}" for port in ports], "--cluster-yes"],
                   capture_output=True, text=True, check=True, timeout=60)
    if not eventually(30, lambda: all("cluster_state:ok" in redis_cli(port, "cluster", "info")
                                      for port in ports)):
        raise SystemExit("the benchmark cluster did not settle")
    return ports


def start_service(procs, workdir, command):
    """`command` (session-cache and its flags) listening on a free loopback port, logging
    at WARN; returns the port and the process once the service serves from its store."""
    port = free_port()
    proc = procs.start([*command, "--listen", f"127.0.0.1:{port}"], env=dict(os.environ, RUST_LOG="warn"))
    wait_port(port, proc=proc)
    wait_serving(port, workdir)
    return port, proc


@contextlib.contextmanager
def service_on_redis(name, service_flags=(), redis_args=()):
    """A Redis of the run's own (`redis_args` added) and the release session-cache on it
    (`service_flags` added), for the scripts that measure one service: yields the work
    directory, the Redis port, the service's port and its process, and stops both on the
    way out."""
    procs = Procs()
    workdir = tempfile.mkdtemp(prefix=f"session-cache-{name}-")
    try:
        redis_port = start_redis(procs, workdir, *redis_args)
        port, proc = start_service(procs, workdir, [
            os.path.join(RELEASE, "session-cache"), "--redis-url", f"redis://127.0.0.1:{redis_port}",
            *service_flags])
        yield workdir, redis_port, port, proc
    finally:
        procs.stop()


@contextlib.contextmanager
def service_on_cluster(name, service_flags=()):
    """A three-primary Redis Cluster of the run's own and the release session-cache on it
    (revocations not waited for: the Cluster has no replicas): yields the work directory,
    the primaries' ports, the service's port and its process."""
    procs = Procs()
    workdir = tempfile.mkdtemp(prefix=f"session-cache-{name}-")
    try:
        ports = start_cluster(procs, workdir)
        port, proc = start_service(procs, workdir, [
            os.path.join(RELEASE, "session-cache"),
            "--redis-cluster-nodes", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--revocation-replicas", "0", *service_flags])
        yield workdir, ports, port, proc
    finally:
        procs.stop()


def wait_serving(port, workdir, deadline_s=10.0):
    """Waits until grpc.health.v1 says the service on `port` serves from its store (its
    first ping has passed); before that, calls would be refused."""
    check = frame(field_bytes(1, SERVICE.encode()))

    def serving():
        try:
            reply, _ = call_once(port, "Check", check, workdir, service=HEALTH)
        except subprocess.CalledProcessError:
            return False
        return first_varint_field(reply) == 1  # HealthCheckResponse.SERVING

    if not eventually(deadline_s, serving):
        raise SystemExit(f"the service on {port} was not SERVING within {deadline_s} s")


# --- load --------------------------------------------------------------------------

def h2load_latencies(log):
    """The latency of each call in an h2load log, in microseconds."""
    with open(log) as f:
        for line in f:
            fields = line.split("\t")
            if len(fields) >= 3:
                yield int(fields[2])


def call_once(port, method, body, workdir, service=SERVICE):
    """One call through curl; returns the framed reply and the grpc-status trailer."""
    path = os.path.join(workdir, "sample.bin")
    with open(path, "wb") as f:
        f.write(body)
    out = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
         "-H", "te: trailers", "--data-binary", f"@{path}", "-D", "-", "-o",
         os.path.join(workdir, "reply.bin"),
         f"http://127.0.0.1:{port}/{grpc_path(method, service)}"],
        capture_output=True, text=True, check=True)
    with open(os.path.join(workdir, "reply.bin"), "rb") as f:
        reply = f.read()
    return reply, out.stdout


def grpc_path(method, service=SERVICE):
    """A method by its name within `service`, or by its full path."""
    return method if "/" in method else f"{service}/{method}"


def h2load(port, method, body, requests, connections, streams, workdir):
    """gRPC `method` with `body`; or, with `body` None, HTTP/1.1 keep-alive GETs of the
    path `method` with `streams` the headers to send (one request per connection at a
    time)."""
    log = os.path.join(workdir, "h2load.log")
    if os.path.exists(log):
        os.remove(log)
    if body is None:
        headers = [arg for header in streams for arg in ("-H", header)]
        argv = ["h2load", "--h1", "-n", str(requests), "-c", str(connections), "-m", "1",
                "-t", "1", "--log-file", log, *headers, f"http://127.0.0.1:{port}{method}"]
    else:
        body_path = os.path.join(workdir, f"{method.rsplit('/', 1)[-1]}.bin")
        with open(body_path, "wb") as f:
            f.write(body)
        argv = ["h2load", "-n", str(requests), "-c", str(connections), "-m", str(streams),
                "-t", "1", "--data", body_path, "--log-file", log,
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                f"http://127.0.0.1:{port}/{grpc_path(method)}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    text = out.stdout
    rps = succeeded = data = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            succeeded = int(line.split(",")[3].split()[0])
        elif line.startswith("traffic:"):
            data = int(line.rsplit("(", 1)[1].split(")")[0])
    if rps is None:
        raise SystemExit(f"h2load failed:\n{text}\n{out.stderr}")
    p50, p99, p999 = quantiles(h2load_latencies(log), (0.50, 0.99, 0.999))
    return {
        "rps": rps,
        "ok": succeeded,
        "bytes_per_reply": data / max(1, succeeded),
        "p50": p50 / 1000,
        "p99": p99 / 1000,
        "p999": p999 / 1000,
    }


def h2load_spread(port, method, bodies, requests, connections, streams, workdir):
    """h2load as one process per body, all at once, the connections and calls shared out
    between them: calls/s over the wall time of the whole, the latencies of every call,
    and the bytes per reply of each body's calls."""
    share = [connections // len(bodies) + (i < connections % len(bodies)) for i in range(len(bodies))]
    calls = [requests * c // connections for c in share]
    calls[-1] += requests - sum(calls)
    runs = []
    started = time.perf_counter()
    for i, (body, c, n) in enumerate(zip(bodies, share, calls)):
        body_path = os.path.join(workdir, f"{method.rsplit('/', 1)[-1]}-{i}.bin")
        with open(body_path, "wb") as f:
            f.write(body)
        log = os.path.join(workdir, f"h2load-{i}.log")
        if os.path.exists(log):
            os.remove(log)
        runs.append((log, subprocess.Popen(
            ["h2load", "-n", str(n), "-c", str(c), "-m", str(streams), "-t", "1",
             "--data", body_path, "--log-file", log,
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://127.0.0.1:{port}/{grpc_path(method)}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    outputs = [(log, *proc.communicate(timeout=600)) for log, proc in runs]
    elapsed = time.perf_counter() - started
    succeeded, per_reply = 0, []
    for _, text, err in outputs:
        ok = data = None
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("requests:"):
                ok = int(line.split(",")[3].split()[0])
            elif line.startswith("traffic:"):
                data = int(line.rsplit("(", 1)[1].split(")")[0])
        if ok is None or data is None:
            raise SystemExit(f"h2load failed:\n{text}\n{err}")
        succeeded += ok
        per_reply.append(data / max(1, ok))
    latencies = (us for log, _, _ in outputs for us in h2load_latencies(log))
    p50, p99, p999 = quantiles(latencies, (0.50, 0.99, 0.999))
    return {
        "rps": succeeded / elapsed,
        "ok": succeeded,
        "bytes_per_reply": per_reply,
        "p50": p50 / 1000,
        "p99": p99 / 1000,
        "p999": p999 / 1000,
    }


def measure(port, pid, redis_ports, method, bodies, requests, in_flight, workdir):
    """One scenario: at 500 in flight one h2load per body (see SPREAD), at 1 in flight
    the first body alone; with the CPU the service and Redis (`redis_ports`) spent per
    call, and what Redis did per call. With `bodies` None, HTTP/1.1 GETs of the path
    `method` (AUTH_HEADERS), one connection per call in flight."""
    cpu0 = cpu_seconds(pid)
    rcpu0 = redis_cpu_seconds(redis_ports)
    commands0, reads0 = redis_io(redis_ports)
    if bodies is None:
        result = h2load(port, method, None, requests, in_flight, AUTH_HEADERS, workdir)
        result["bytes_per_reply"] = [result["bytes_per_reply"]]
    elif in_flight == 500:
        result = h2load_spread(port, method, bodies, requests, 50, 10, workdir)
    else:
        result = h2load(port, method, bodies[0], requests, 1, 1, workdir)
        result["bytes_per_reply"] = [result["bytes_per_reply"]]
    result["cpu_us"] = (cpu_seconds(pid) - cpu0) / requests * 1e6
    result["redis_us"] = ((redis_cpu_seconds(redis_ports) - rcpu0) / requests * 1e6
                          if redis_ports else None)
    commands, reads = redis_io(redis_ports)
    # What Redis did per call: commands run, and socket reads (a pipeline's worth each).
    result["redis_commands"] = (commands - commands0) / requests if redis_ports else None
    result["redis_reads"] = (reads - reads0) / requests if redis_ports else None
    result["rss"] = rss_mib(pid, peak=True)
    return result


def redis_benchmark(port, test, requests, in_flight):
    clients, pipeline = (50, 10) if in_flight == 500 else (1, 1)
    cpu0 = redis_cpu_seconds([port])
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", test, "-n", str(requests), "-c",
         str(clients), "-P", str(pipeline), "--csv"],
        capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith('"' + test.upper()))
    cells = [c.strip('"') for c in row.split(",")]
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    # Redis's CPU per command: what a plain GET costs it at this concurrency, the floor
    # of a lookup's Redis CPU (a hit reads two keys).
    redis_us = (redis_cpu_seconds([port]) - cpu0) / requests * 1e6
    return {"rps": float(cells[1]), "p50": float(cells[4]), "p99": float(cells[6]),
            "p999": None, "cpu_us": None, "redis_us": redis_us, "rss": None}


def seed_equivalent(port, lookups):
    """The Python service's lookup: GET the entry, parse it, GET the marker."""
    import redis  # redis-py, as the Python service uses
    client = redis.Redis(port=port)
    key = "session_cache:seedbench"
    client.set(key, json.dumps({
        "user_id": "seed-user", "email": "seed-user@example.com", "name": "Bench User",
        "email_verified": True, "tier": "pro", "created_at": "2024-01-15T10:30:00+00:00",
        "updated_at": "2024-01-15T10:30:00+00:00",
        "session_expire": "2099-12-31T00:00:00+00:00", "cached_at": time.time()}), ex=300)
    started = time.perf_counter()
    for _ in range(lookups):
        data = json.loads(client.get(key))
        client.get("user_invalidated:" + data["user_id"])
    elapsed = time.perf_counter() - started
    return {"rps": lookups / elapsed, "p50": elapsed / lookups * 1000, "p99": None,
            "p999": None, "cpu_us": None, "redis_us": None, "rss": None}


def median_result(results):
    """One result of several runs of a scenario: each figure's median; the fewest calls
    that succeeded, and the highest peak RSS."""
    out = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key == "ok":
            out[key] = min(values)
        elif key == "rss":
            out[key] = max((v for v in values if v is not None), default=None)
        elif all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
        else:
            out[key] = values[0]
    return out


# --- the targets ----------------------------------------------------------------

def targets(rows, floors, floor_of):
    """The targets, from this run's rows: (figure, value, target, met or None
    when the run lacks a row it needs). Each row is held against the floor measured
    just before it (`floor_of`), else the run's first; a Cluster row against the
    one-Redis row of the same scenario, each first divided by its own floor (so that
    the host's drift between the two rows does not count)."""
    by = {(name, f): r for name, f, r in rows}

    def floor_for(name, in_flight):
        return floor_of.get((name, in_flight)) or floors.get(in_flight)

    def ratio(name, key, in_flight=500):
        r, floor = by.get((name, in_flight)), floor_for(name, in_flight)
        if r and "vs_floor" in r:
            return r["vs_floor"][key]
        if not r or not floor or not r.get(key) or not floor.get(key):
            return None
        return r[key] / floor[key]

    def vs_redis(scenario, key):
        cluster, redis = ratio(f"cluster: {scenario}", key), ratio(f"redis: {scenario}", key)
        return None if cluster is None or not redis else cluster / redis

    out = []

    def bound(figure, value, limit, most=True, text=None):
        met = None if value is None else (value <= limit if most else value >= limit)
        out.append((figure, text or fmt(value) + "x", f"{'<=' if most else '>='} {limit}x", met))

    bound("Get hit on Redis, server CPU per call vs the floor",
          ratio("redis: Get hit", "cpu_us"), 1.5)
    bound("Get hit on Redis, throughput vs the floor", ratio("redis: Get hit", "rps"), 0.65,
          most=False)
    bound("Get hit on memory, server CPU per call vs the floor",
          ratio("memory: Get hit", "cpu_us"), 1.15)
    for rpc in ("Set", "InvalidateUser"):
        bound(f"{rpc} on Redis, server CPU per call vs the floor",
              ratio(f"redis: {rpc}", "cpu_us"), 1.8)
    # Validation at the edge: Check and /auth beside Validate, same store, same run.
    for store in ("redis", "memory"):
        check, validate = by.get((f"{store}: Check hit", 500)), by.get((f"{store}: Validate hit", 500))
        if check and validate:
            bound(f"Check hit on {store}, throughput vs Validate hit",
                  check["rps"] / validate["rps"], 0.9, most=False)
            bound(f"Check hit on {store}, server CPU per call vs Validate hit",
                  check["cpu_us"] / validate["cpu_us"], 1.15)
        auth = by.get((f"{store}: /auth hit", 500))
        if auth and validate:
            bound(f"/auth hit on {store} (HTTP/1.1), server CPU per call vs Validate hit",
                  auth["cpu_us"] / validate["cpu_us"], 1.2)
    hit1, floor1 = by.get(("redis: Get hit", 1)), floor_for("redis: Get hit", 1)
    get1 = by.get(("floor: redis-benchmark GET", 1))
    if hit1 and floor1 and get1:
        over_us = (hit1["p50"] - floor1["p50"] - get1["p50"]) * 1000
        out.append(("Get hit on Redis at 1 in flight, p50",
                    f"floor + Redis GET + {over_us:.0f} us", "floor + Redis GET + 30 us",
                    over_us <= 30))
    rss = [r["rss"] for name, _, r in rows
           if r.get("rss") and not name.startswith("floor")]
    peak = max(rss) if rss else None
    out.append(("Peak RSS under the full benchmark (the service, any store)",
                f"{fmt(peak, 1)} MiB", "<= 32 MiB", None if peak is None else peak <= 32))
    for scenario in ("Get hit", "Validate hit"):
        bound(f"Cluster {scenario}, server CPU per call vs one Redis's",
              vs_redis(scenario, "cpu_us"), 1.15)
        redis_us = (by.get((f"cluster: {scenario}", 500)) or {}).get("redis_us")
        out.append((f"Cluster {scenario}, Redis CPU per call (all primaries)",
                    f"{fmt(redis_us, 1)} us", "<= 2 us",
                    None if redis_us is None else redis_us <= 2))
        bound(f"Cluster {scenario}, throughput vs one Redis's", vs_redis(scenario, "rps"), 0.9,
              most=False)
        bound(f"Cluster {scenario}, p99 vs one Redis's", vs_redis(scenario, "p99"), 1.3)
    for rpc in ("Set", "InvalidateUser"):
        bound(f"Cluster {rpc}, server CPU per call vs one Redis's", vs_redis(rpc, "cpu_us"), 1.2)
    return out


def print_targets(rows, floors, floor_of):
    print()
    print("| figure | this run | target | |")
    print("|---|---:|---:|---|")
    for figure, value, target, met in targets(rows, floors, floor_of):
        verdict = "-" if met is None else ("met" if met else "not met")
        print(f"| {figure} | {value} | {target} | {verdict} |")


# --- the run -----------------------------------------------------------------------

def fmt(value, digits=2):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--requests", type=int, default=200_000,
                        help="calls per scenario at 500 in flight")
    parser.add_argument("--bin-dir", default=RELEASE,
                        help="where the session-cache and examples/constant_server binaries are")
    parser.add_argument("--pairs", type=int, default=3,
                        help="floor and scenario alternate this many times per row")
    parser.add_argument("--service-args", default="",
                        help="more flags for every session-cache subject, e.g. '--redis-lookup script'")
    args = parser.parse_args()
    if args.quick:
        args.pairs = 1
    bin_dir = os.path.abspath(args.bin_dir)
    many = 3_000 if args.quick else args.requests
    few = 300 if args.quick else max(2_000, args.requests // 20)

    procs = Procs()
    workdir = tempfile.mkdtemp(prefix="session-cache-bench-")
    rows = []
    appwrite = None
    try:
        redis_port = start_redis(procs, workdir)

        cluster_ports = start_cluster(procs, workdir)

        floor_port = free_port()
        floor = procs.start([os.path.join(bin_dir, "examples", "constant_server"),
                             f"127.0.0.1:{floor_port}"])
        wait_port(floor_port, proc=floor)

        appwrite = start_appwrite_stand_in()
        subjects, http_ports = {}, {}
        redis_ports = {"redis": [redis_port], "cluster": cluster_ports, "memory": []}
        for store in ("redis", "cluster", "memory"):
            cmd = [os.path.join(bin_dir, "session-cache"), *appwrite.flags()]
            if store == "redis":
                cmd += ["--redis-url", f"redis://127.0.0.1:{redis_port}"]
            if store == "cluster":
                # No replicas here: revocations are not waited for, as on one Redis.
                cmd += ["--redis-cluster-nodes",
                        ",".join(f"127.0.0.1:{p}" for p in cluster_ports),
                        "--revocation-replicas", "0"]
            if args.quick:
                # Debug binaries on a busy CI machine: give Redis time, so that every
                # reply is the hit the smoke checks for.
                cmd += ["--store-timeout-ms", "2000"]
            cmd += shlex.split(args.service_args)
            http_ports[store] = free_port()
            # /auth at 500 in flight is 500 HTTP/1.1 connections from one address, as
            # from one busy proxy: more than the default share of one address.
            cmd += ["--http-listen", f"127.0.0.1:{http_ports[store]}",
                    "--http-max-connections-per-peer", "1024"]
            subjects[store] = start_service(procs, workdir, cmd)

        hit_bodies = [get_request(token) for token in TOKENS]
        # The floor and each subject must answer the sample as expected.
        reply, _ = call_once(floor_port, "Get", hit_bodies[0], workdir)
        assert first_varint_field(reply) == 1, "the floor answers HIT"
        hit_bytes = len(reply)

        def check(port, method, bodies, outcome):
            """Calls `port` once with each body; each must answer `outcome` with
            grpc-status 0. The size of each reply."""
            sizes = []
            for body in bodies:
                reply, headers = call_once(port, method, body, workdir)
                got = first_varint_field(reply)
                if got != outcome or "grpc-status: 0" not in headers.lower():
                    raise SystemExit(f"{method} on {port}: outcome {got}, wanted {outcome}\n{headers}")
                sizes.append(len(reply))
            return sizes

        def checked(name, r, sizes, requests):
            """Every call of the run succeeded with the reply its sample had: a miss or
            an error would be shorter."""
            if r["ok"] != requests or any(abs(got - want) > 0.5
                                          for got, want in zip(r["bytes_per_reply"], sizes)):
                raise SystemExit(f"{name}: {r['ok']} of {requests} ok, bytes per reply "
                                 f"{r['bytes_per_reply']}, wanted {sizes}")

        for in_flight, requests in ((500, many), (1, few)):
            r = measure(floor_port, floor.pid, [], "Get", hit_bodies, requests, in_flight, workdir)
            rows.append(("floor: constant server, Get", in_flight, r))
            for test in ("get", "set"):
                rows.append((f"floor: redis-benchmark {test.upper()}", in_flight,
                             redis_benchmark(redis_port, test, requests, in_flight)))

        # Each scenario is held against the floor measured right before it, at the same
        # load: the host's speed drifts within a run (20-40% over minutes on a shared
        # host), and a ratio is only as good as its floor.
        floor_of = {}

        def beside(name, in_flight, requests, run):
            # Floor and scenario alternate `--pairs` times; the row shows each figure's
            # median, and its ratios are the medians of the pairs' ratios.
            pairs = []
            for _ in range(args.pairs):
                pairs.append((measure(floor_port, floor.pid, [], "Get", hit_bodies, requests,
                                      in_flight, workdir), run()))
            floor_of[(name, in_flight)] = median_result([f for f, _ in pairs])
            r = median_result([r for _, r in pairs])
            r["vs_floor"] = {key: statistics.median(r_[key] / f[key] for f, r_ in pairs)
                             for key in ("rps", "cpu_us", "p99")}
            rows.append((name, in_flight, r))
            return r

        # Each scenario's calls, one body per load process (see SPREAD).
        validate_bodies = [validate_request(token) for token in VALIDATE_TOKENS]
        check_bodies = [check_request(token) for token in VALIDATE_TOKENS]
        miss_bodies = [get_request(token) for token in spread("bench-miss-", entry_key)]
        set_bodies = [set_request(token, user) for token, user in
                      zip(spread("bench-set-", entry_key), USERS)]
        invalidate_bodies = [invalidate_user_request(user) for user in
                             spread("bench-invalidated-", lambda user: "user_invalidated:" + user)]
        for store, (port, proc) in subjects.items():
            rport = redis_ports[store]
            for in_flight, requests in ((500, many), (1, few)):
                def subject(method, bodies, in_flight=in_flight, requests=requests,
                            port=port, pid=proc.pid, rport=rport):
                    return lambda: measure(port, pid, rport, method, bodies, requests,
                                           in_flight, workdir)

                check(port, "Set", [set_request(token, user) for token, user in zip(TOKENS, USERS)], 1)
                sizes = check(port, "Get", hit_bodies, 1)
                assert sizes == [hit_bytes] * len(sizes), f"hits are {sizes} bytes, the floor's {hit_bytes}"
                r = beside(f"{store}: Get hit", in_flight, requests, subject("Get", hit_bodies))
                checked(f"{store} Get hit", r, sizes, requests)
                # Validate of tokens the provider vouched for once: hits, no provider call.
                sizes = check(port, "Validate", validate_bodies, 1)
                r = beside(f"{store}: Validate hit", in_flight, requests,
                           subject("Validate", validate_bodies))
                checked(f"{store} Validate hit", r, sizes, requests)
                # Envoy's Check of the same tokens: the same decisions, hits.
                sizes = []
                for body in check_bodies:
                    reply, headers = call_once(port, CHECK, body, workdir)
                    if not check_allowed(reply) or "grpc-status: 0" not in headers.lower():
                        raise SystemExit(f"{store} Check: not allowed\n{headers}")
                    sizes.append(len(reply))
                r = beside(f"{store}: Check hit", in_flight, requests, subject(CHECK, check_bodies))
                checked(f"{store} Check hit", r, sizes, requests)
                # /auth of one of them over HTTP/1.1 keep-alive, as nginx asks it.
                hport = http_ports[store]
                sample = subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", "-D", "-",
                     *[arg for header in AUTH_HEADERS for arg in ("-H", header)],
                     f"http://127.0.0.1:{hport}/auth"], capture_output=True, text=True, check=True)
                if " 200" not in sample.stdout.splitlines()[0] or "x-auth-request-user: " not in sample.stdout:
                    raise SystemExit(f"{store} /auth: not allowed\n{sample.stdout}")
                r = beside(f"{store}: /auth hit", in_flight, requests,
                           subject("/auth", None, port=hport))
                if r["ok"] != requests:
                    raise SystemExit(f"{store} /auth hit: {r['ok']} of {requests} answered 2xx")
                if in_flight == 1:
                    continue
                sizes = check(port, "Get", miss_bodies, 2)
                r = beside(f"{store}: Get miss", in_flight, requests, subject("Get", miss_bodies))
                checked(f"{store} Get miss", r, sizes, requests)
                sizes = check(port, "Set", set_bodies, 1)
                r = beside(f"{store}: Set", in_flight, requests, subject("Set", set_bodies))
                checked(f"{store} Set", r, sizes, requests)
                r = beside(f"{store}: InvalidateUser", in_flight, requests,
                           subject("InvalidateUser", invalidate_bodies))
                if r["ok"] != requests:
                    raise SystemExit(f"{store} InvalidateUser: {r['ok']} of {requests} ok")

        rows.append(("seed-equivalent: redis-py GET+parse+GET", 1,
                     seed_equivalent(redis_port, few)))
    finally:
        procs.stop()
        if appwrite is not None:
            appwrite.stop()

    floors = {f: r for name, f, r in rows if name == "floor: constant server, Get"}
    print()
    print(f"calls per scenario: {many:,} at 500 in flight, {few:,} at 1 in flight; "
          f"{os.cpu_count()} cores")
    print()
    print("| scenario | in flight | calls/s | p50 ms | p99 ms | p999 ms | server CPU us/call "
          "| Redis CPU us/call | peak RSS MiB | floor beside: calls/s, CPU us/call "
          "| calls/s vs floor | CPU vs floor | p99 vs floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    def beside_text(name, in_flight):
        floor = floor_of.get((name, in_flight))
        return f"{fmt(floor['rps'], 0)}, {fmt(floor['cpu_us'], 1)}" if floor else "-"

    for name, in_flight, r in rows:
        floor = floor_of.get((name, in_flight)) or floors.get(in_flight, {})

        def ratio(key, r=r, floor=floor):
            if "vs_floor" in r:
                return r["vs_floor"][key]
            return (r[key] / floor[key]) if r.get(key) and floor.get(key) else None

        print(f"| {name} | {in_flight} | {fmt(r['rps'], 0)} | {fmt(r['p50'], 3)} | "
              f"{fmt(r['p99'], 3)} | {fmt(r['p999'], 3)} | {fmt(r['cpu_us'], 1)} | "
              f"{fmt(r['redis_us'], 1)} | {fmt(r['rss'], 1)} | "
              f"{beside_text(name, in_flight)} | {fmt(ratio('rps'))} | "
              f"{fmt(ratio('cpu_us'))} | {fmt(ratio('p99'))} |")
    print_targets(rows, floors, floor_of)
    seed = rows[-1][2]["rps"]
    hits = [r["rps"] for name, f, r in rows if name == "redis: Get hit" and f == 500]
    if hits:
        print(f"\nlookups/s, service on Redis (500 in flight) vs seed-equivalent (1 in flight): "
              f"{hits[0] / seed:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
