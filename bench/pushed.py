#!/usr/bin/env python3
"""Measures the revocations pushed by the identity provider (SPEC §12) on one Redis: Appwrite
webhooks and back-channel logout tokens per second, with the service's and Redis's CPU per
request, and beside them Get hits on the same server and on one without the HTTP listener
(the listener must cost the gRPC path nothing).

    scripts/python-env.sh                                    # PyJWT, for the logout tokens
    cargo build --release --bin session-cache
    target/ecosystem/venv/bin/python bench/pushed.py [--requests N] [--quick]

Load: wrk (HTTP/1.1, 50 connections, 2 threads) for the HTTP paths. Every webhook is the
same signed sign-out of one user: a delivery sent again revokes again, the same store
write. Every logout token is a different one (a jti is accepted once), RS256 like
Keycloak's, signed beforehand with PyJWT and cycled through by wrk's Lua. h2load (50
connections x 10 streams) for Get, with bench.py's helpers. Each row checks its answers:
wrk's non-2xx count must be 0, and a Get's reply must be a HIT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid

# bench.py beside this file (on the path as the script's own directory): processes,
# h2load, protobuf by hand.
import bench
from testkit.oidc import KeySet

WRK_SCRIPT = """
-- Each thread sends its share of the logout tokens in TOKENS (every other line, by its
-- id), one request each: no token is sent twice while any is left.
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
local tokens = {}
local next_token = 1
function init(args)
  local line_number = 0
  for line in io.lines(os.getenv("TOKENS")) do
    if line_number % 2 == id then
      tokens[#tokens + 1] = line
    end
    line_number = line_number + 1
  end
end
function request()
  local body = "logout_token=" .. tokens[next_token]
  next_token = next_token % #tokens + 1
  return wrk.format("POST", "/backchannel-logout",
    {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end
refused, unavailable = 0, 0
function response(status, headers, body)
  if status == 400 then refused = refused + 1 end
  if status == 503 then unavailable = unavailable + 1 end
end
function done(summary, latency, requests)
  local r, u = 0, 0
  for _, thread in ipairs(threads) do
    r = r + thread:get("refused")
    u = u + thread:get("unavailable")
  end
  io.write(string.format("answered 400: %d, 503: %d\\n", r, u))
end
"""


def write_logout_tokens(keys, count, path):
    """Writes `count` logout tokens of `keys` (testkit.oidc) for users bench-0..99, one
    per line. Signing takes about 0.5 ms a token, so each token's `iat` is its signing
    time plus 30 s: the service accepts an `iat` within 60 s of its clock either way, so
    every token is still acceptable when the run, up to a minute later, sends it."""
    with open(path, "w") as f:
        for i in range(count):
            f.write(keys.logout_token(f"bench-{i % 100}", issued=int(time.time()) + 30) + "\n")


def wrk(url, seconds, workdir, script=None, headers=(), body=None, env=None):
    """wrk for `seconds`: its requests/s, latency percentiles (ms) and how many answers
    were not 2xx."""
    args = ["wrk", "-t", "2", "-c", "50", "-d", f"{seconds}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    if script is None:
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as f:
            f.write(f"wrk.method = \"POST\"\nwrk.body = {json.dumps(body)}\n")
    args += ["-s", script, url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    text = out.stdout
    # A script that does not load leaves wrk sending plain GETs: fail instead.
    if out.returncode != 0 or out.stderr.strip():
        raise SystemExit(f"wrk failed:\n{text}\n{out.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)

    def percentile(name):
        found = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", text)
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {"rps": rps, "requests": total, "failed": int(non2xx.group(1)) if non2xx else 0,
            "p50": percentile("50"), "p99": percentile("99"), "text": text}


def measured(pid, redis_port, run):
    """`run()`'s result with the service's and Redis's CPU per request (µs)."""
    cpu0, rcpu0 = bench.cpu_seconds(pid), bench.redis_cpu_seconds([redis_port])
    result = run()
    done = max(1, result.get("requests") or result.get("ok") or 1)
    result["cpu_us"] = (bench.cpu_seconds(pid) - cpu0) / done * 1e6
    result["redis_us"] = (bench.redis_cpu_seconds([redis_port]) - rcpu0) / done * 1e6
    return result


def get_hit(port, pid, redis_port, requests, workdir):
    token = "bench-hit-token"
    reply, _ = bench.call_once(port, "Set", bench.set_request(token, "bench-hit-user"), workdir)
    reply, _ = bench.call_once(port, "Get", bench.get_request(token), workdir)
    assert bench.first_varint_field(reply) == 1, "Get is not a HIT"
    result = measured(pid, redis_port, lambda: bench.h2load(
        port, "Get", bench.get_request(token), requests, 50, 10, workdir))
    assert result["ok"] == requests, f"{requests - result['ok']} Gets failed"
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", default=bench.RELEASE)
    parser.add_argument("--requests", type=int, default=100_000, help="Get hits per row")
    parser.add_argument("--seconds", type=int, default=10, help="how long each HTTP row runs")
    parser.add_argument("--quick", action="store_true", help="a smoke: small counts")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds = 2_000, 1
    binary = os.path.join(args.bin_dir, "session-cache")
    procs = bench.Procs()
    workdir = tempfile.mkdtemp(prefix="session-cache-pushed-")
    keys = KeySet(realm="bench", kid="bench-1")
    try:
        redis_port = bench.start_redis(procs, workdir)
        key, webhook_port = uuid.uuid4().hex * 4, bench.free_port()
        key_file = os.path.join(workdir, "webhook-key")
        with open(key_file, "w") as f:
            f.write(key + "\n")
        url = f"http://127.0.0.1:{webhook_port}/webhooks/appwrite"

        def serve(*extra):
            port = bench.free_port()
            proc = procs.start([binary, "--listen", f"127.0.0.1:{port}", "--redis-url",
                                f"redis://127.0.0.1:{redis_port}", *extra])
            bench.wait_port(port)
            time.sleep(0.5)  # the first health ping
            return port, proc.pid

        rows = []
        plain_port, plain_pid = serve()
        rows.append(("Get hit, no HTTP listener", get_hit(plain_port, plain_pid, redis_port, args.requests, workdir)))
        port, pid = serve("--http-listen", f"127.0.0.1:{webhook_port}",
                          "--appwrite-webhook-key-file", key_file, "--appwrite-webhook-url", url,
                          "--oidc-issuer", keys.issuer, "--oidc-audience", "session-cache",
                          "--oidc-jwks-url", f"{keys.issuer}/protocol/openid-connect/certs")
        bench.wait_port(webhook_port)
        rows.append(("Get hit, HTTP listener idle", get_hit(port, pid, redis_port, args.requests, workdir)))

        # The same sign-out each time, as Appwrite's worker writes and signs it.
        body = json.dumps({"$id": "session-1", "userId": "bench-user", "provider": "email"},
                          separators=(",", ":")).replace("/", "\\/")
        signature = base64.b64encode(hmac.new(key.encode(), (url + body).encode(), hashlib.sha1).digest()).decode()
        events = ("users.bench-user.sessions.session-1.delete,users.*.sessions.*.delete,"
                  "users.bench-user.sessions.*.delete,users.*.sessions.session-1.delete,"
                  "users.bench-user,users.*")
        headers = ["Content-Type: application/json", f"X-Appwrite-Webhook-Events: {events}",
                   f"X-Appwrite-Webhook-Signature: {signature}"]
        webhook = measured(pid, redis_port, lambda: wrk(url, args.seconds, workdir, headers=headers, body=body))
        rows.append(("POST /webhooks/appwrite (revoked)", webhook))

        tokens = os.path.join(workdir, "tokens")
        count = 120_000 if not args.quick else 20_000
        started = time.time()
        write_logout_tokens(keys, count, tokens)
        print(f"({count} logout tokens signed in {time.time() - started:.1f}s)", file=sys.stderr)
        script = os.path.join(workdir, "logout.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        logout = measured(pid, redis_port, lambda: wrk(
            f"http://127.0.0.1:{webhook_port}/backchannel-logout", args.seconds, workdir, script=script,
            env={"TOKENS": tokens}))
        if logout["requests"] > count:
            print(f"(wrk sent {logout['requests']} tokens, more than the {count} made: "
                  "the replays are answered 400 and counted as failed)", file=sys.stderr)
        print(re.search(r"answered 400.*", logout["text"]).group(0), file=sys.stderr)
        rows.append(("POST /backchannel-logout (RS256, revoked)", logout))
        rows.append(("Get hit, after the HTTP load", get_hit(port, pid, redis_port, args.requests, workdir)))

        print(f"{'scenario':44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu µs':>8} {'redis µs':>9} {'failed':>7}")
        for name, r in rows:
            failed = r.get("failed", r.get("ok") is not None and args.requests - r["ok"])
            print(f"{name:44} {r['rps']:9.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['cpu_us']:8.1f} "
                  f"{r['redis_us']:9.1f} {failed:7}")
        failures = [name for name, r in rows if r.get("failed")]
        if failures:
            print("not every request was answered 2xx:", ", ".join(failures), file=sys.stderr)
            return 1
        return 0
    finally:
        procs.stop()
        keys.stop()


if __name__ == "__main__":
    sys.exit(main())
