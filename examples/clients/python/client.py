#!/usr/bin/env python3
"""Example session-cache caller in Python (grpcio).

Shows how a service puts session-cache in front of its identity provider, and checks
that the server answers as the API promises. The stubs are generated from
../../../proto at start-up into a temporary directory, so nothing generated is kept.

    python client.py HOST:PORT                 # the caller flow (exit 0 when all is as expected)
    python client.py HOST:PORT --store-down    # the flow while the server's Redis is down

The flow: Get misses and hands out a fence; the caller validates the token with the
identity provider and Sets the session with that fence; Get hits; InvalidateUser (a
password change) hides the session; a Set whose validation began before the password
change is refused as STALE; InvalidateToken (a logout) deletes the session and refuses
a late Set as REVOKED. `lookup()` is the helper a real service would call on every
request: it treats UNAVAILABLE, DISABLED and an unreachable cache as "ask the identity
provider". Any unexpected answer is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

SERVICE = "sessioncache.v1.SessionCache"
CALL_TIMEOUT_S = 5.0
DEFAULT_PROTO_DIR = Path(__file__).resolve().parent / ".." / ".." / ".." / "proto"


def load_stubs(proto_dir: Path):
    """Generates the Python messages and stubs from the proto into a temporary directory
    (removed at exit) and imports them."""
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = proto_dir.resolve()
    source = proto_dir / "sessioncache" / "v1" / "session_cache.proto"
    if not source.is_file():
        sys.exit(f"client: no proto at {source} (give --proto-dir)")
    out = tempfile.mkdtemp(prefix="session-cache-stubs-")
    atexit.register(shutil.rmtree, out, True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(source),
        ]
    )
    if rc != 0:
        sys.exit(f"client: protoc failed on {source} (status {rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("sessioncache.v1.session_cache_pb2")
    pb_grpc = importlib.import_module("sessioncache.v1.session_cache_pb2_grpc")
    return pb, pb_grpc


pb, pb_grpc = None, None  # set in main()


class Unexpected(Exception):
    """An answer the API does not allow at this point of the flow."""


def expect(step: str, condition: bool, detail: str) -> None:
    if not condition:
        raise Unexpected(f"{step}: {detail}")
    print(f"ok   {step}")


def outcome_name(enum, value: int) -> str:
    return enum.Name(value) if value in enum.values() else f"unknown outcome {value}"


def ts(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# --- the identity provider, simulated -------------------------------------------------


class IdentityProvider:
    """Stands in for Appwrite or similar: validating a token costs a round trip there.
    Every token it is asked about belongs to the user it was built with."""

    def __init__(self, user_id: str):
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        self.user = pb.User(
            id=user_id,
            email=f"{user_id}@example.com",
            name="Ada Lovelace",
            email_verified=True,
            tier="pro",
            created_at=ts(dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.timezone.utc)),
            updated_at=ts(now - dt.timedelta(days=1)),
        )
        self.session_expire = ts(now + dt.timedelta(hours=1))
        self.calls = 0

    def validate(self, token: str):
        self.calls += 1
        return self.user, self.session_expire


# --- what a service does on each request ---------------------------------------------


@dataclass
class Lookup:
    user: object
    session_expire: Timestamp
    source: str  # "cache" or "identity provider"
    why: str  # the Get outcome, or the gRPC status of a failed call
    set_outcome: str | None  # the outcome of the Set that followed, if any


def lookup(stub, token: str, idp: IdentityProvider) -> Lookup:
    """Finds the user of a session token: from the cache when it has it, else from the
    identity provider, caching the answer with the fence from the Get.

    UNAVAILABLE (the cache's store did not answer), DISABLED (caching is off) and a
    failed call (the cache itself is unreachable) all mean "ask the identity provider";
    without a fence nothing is Set, so that a password change during the validation
    cannot be undone by this request."""
    try:
        got = stub.Get(pb.GetRequest(token=token), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        user, expire = idp.validate(token)
        return Lookup(user, expire, "identity provider", f"Get failed: {err.code().name}", None)

    why = outcome_name(pb.GetOutcome, got.outcome)
    if got.outcome == pb.GET_OUTCOME_HIT:
        return Lookup(got.user, got.session_expire, "cache", why, None)
    if got.outcome in (pb.GET_OUTCOME_UNAVAILABLE, pb.GET_OUTCOME_DISABLED):
        user, expire = idp.validate(token)
        return Lookup(user, expire, "identity provider", why, None)
    if got.outcome in (
        pb.GET_OUTCOME_MISS,
        pb.GET_OUTCOME_EXPIRED,
        pb.GET_OUTCOME_INVALIDATED,
        pb.GET_OUTCOME_CORRUPT,
    ):
        user, expire = idp.validate(token)
        request = pb.SetRequest(token=token, user=user, session_expire=expire, fence=got.fence)
        try:
            stored = stub.Set(request, timeout=CALL_TIMEOUT_S)
            set_outcome = outcome_name(pb.SetOutcome, stored.outcome)
        except grpc.RpcError as err:
            # The user is valid all the same: only the caching failed.
            set_outcome = f"Set failed: {err.code().name}"
        return Lookup(user, expire, "identity provider", why, set_outcome)
    raise Unexpected(f"Get answered {why}")


def invalidate_user(stub, user_id: str, attempts: int = 3):
    """Records a password change. gRPC UNAVAILABLE means the store did not acknowledge
    it: retry (here a bounded number of times, then the error is the caller's)."""
    for attempt in range(1, attempts + 1):
        try:
            return stub.InvalidateUser(pb.InvalidateUserRequest(user_id=user_id), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                raise
            time.sleep(0.1 * attempt)


# --- the checks -----------------------------------------------------------------------


def same_user(a, b) -> bool:
    return all(
        getattr(a, field) == getattr(b, field)
        for field in ("id", "email", "name", "email_verified", "tier", "created_at", "updated_at")
    )


def flow(stub) -> None:
    run = uuid.uuid4().hex[:12]
    idp = IdentityProvider(f"py-user-{run}")
    token = f"py-token-{run}-a"

    # 1. A miss hands out a fence.
    got = stub.Get(pb.GetRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Get of a new token misses with a fence",
           got.outcome == pb.GET_OUTCOME_MISS and got.fence != "",
           f"got {outcome_name(pb.GetOutcome, got.outcome)}, fence {got.fence!r}")

    # 2. Validate with the identity provider, then Set with that fence.
    user, expire = idp.validate(token)
    stored = stub.Set(pb.SetRequest(token=token, user=user, session_expire=expire, fence=got.fence),
                      timeout=CALL_TIMEOUT_S)
    expect("Set with the fence is STORED",
           stored.outcome == pb.SET_OUTCOME_STORED and 1 <= stored.ttl_seconds <= 3600,
           f"got {outcome_name(pb.SetOutcome, stored.outcome)}, ttl {stored.ttl_seconds}")

    # 3. The next Get hits, with the user as the identity provider described it.
    got = stub.Get(pb.GetRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Get after Set hits", got.outcome == pb.GET_OUTCOME_HIT,
           f"got {outcome_name(pb.GetOutcome, got.outcome)}")
    expect("the hit carries the user and session_expire that were Set",
           same_user(got.user, user) and got.session_expire == expire and got.fence == "",
           f"got user {got.user} session_expire {got.session_expire} fence {got.fence!r}")
    found = lookup(stub, token, idp)
    expect("lookup() answers from the cache", found.source == "cache" and found.user.id == user.id,
           f"got {found}")

    # 4. A password change hides every session of the user.
    marked = invalidate_user(stub, user.id)
    expect("InvalidateUser records an instant", marked.invalidated_at.seconds > 0, f"got {marked}")
    got = stub.Get(pb.GetRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Get after InvalidateUser answers INVALIDATED with a fence",
           got.outcome == pb.GET_OUTCOME_INVALIDATED and got.fence != "",
           f"got {outcome_name(pb.GetOutcome, got.outcome)}, fence {got.fence!r}")

    # 5. A validation that began before a password change must not be cached.
    token_b = f"py-token-{run}-b"
    got = stub.Get(pb.GetRequest(token=token_b), timeout=CALL_TIMEOUT_S)
    expect("Get of a second token misses with a fence",
           got.outcome == pb.GET_OUTCOME_MISS and got.fence != "",
           f"got {outcome_name(pb.GetOutcome, got.outcome)}")
    old_fence = got.fence
    user, expire = idp.validate(token_b)  # ...meanwhile the password changes:
    invalidate_user(stub, user.id)
    stale = stub.Set(pb.SetRequest(token=token_b, user=user, session_expire=expire, fence=old_fence),
                     timeout=CALL_TIMEOUT_S)
    expect("Set with a fence older than the InvalidateUser is STALE",
           stale.outcome == pb.SET_OUTCOME_STALE,
           f"got {outcome_name(pb.SetOutcome, stale.outcome)}")
    got = stub.Get(pb.GetRequest(token=token_b), timeout=CALL_TIMEOUT_S)
    expect("nothing was cached by the stale Set", got.outcome == pb.GET_OUTCOME_MISS,
           f"got {outcome_name(pb.GetOutcome, got.outcome)}")

    # 6. A fresh validation after the password change is cached again, through lookup().
    found = lookup(stub, token_b, idp)
    expect("lookup() of a missed token asks the identity provider and caches the answer",
           found.source == "identity provider" and found.set_outcome == "SET_OUTCOME_STORED",
           f"got {found}")
    found = lookup(stub, token_b, idp)
    expect("lookup() then answers from the cache", found.source == "cache", f"got {found}")

    # 7. Logout deletes the session and refuses a Set that arrives late.
    gone = stub.InvalidateToken(pb.InvalidateTokenRequest(token=token_b), timeout=CALL_TIMEOUT_S)
    expect("InvalidateToken deletes the cached session", gone.deleted, f"got {gone}")
    got = stub.Get(pb.GetRequest(token=token_b), timeout=CALL_TIMEOUT_S)
    expect("Get after InvalidateToken misses", got.outcome == pb.GET_OUTCOME_MISS,
           f"got {outcome_name(pb.GetOutcome, got.outcome)}")
    late = stub.Set(pb.SetRequest(token=token_b, user=user, session_expire=expire, fence=got.fence),
                    timeout=CALL_TIMEOUT_S)
    expect("a Set after the logout is REVOKED", late.outcome == pb.SET_OUTCOME_REVOKED,
           f"got {outcome_name(pb.SetOutcome, late.outcome)}")


class FakeCache:
    """A stand-in stub whose Get answers one outcome, to show lookup() on outcomes a
    healthy server does not give; it fails the run if lookup() Sets without a fence."""

    def __init__(self, outcome: int):
        self.outcome = outcome

    def Get(self, request, timeout=None):
        return pb.GetResponse(outcome=self.outcome)

    def Set(self, request, timeout=None):
        raise Unexpected("lookup() called Set although Get gave no fence")


def unavailable_is_a_miss() -> None:
    idp = IdentityProvider("py-user-fallback")
    for outcome in (pb.GET_OUTCOME_UNAVAILABLE, pb.GET_OUTCOME_DISABLED):
        name = pb.GetOutcome.Name(outcome)
        found = lookup(FakeCache(outcome), "py-token-fallback", idp)
        expect(f"lookup() on {name} asks the identity provider and Sets nothing",
               found.source == "identity provider" and found.why == name and found.set_outcome is None,
               f"got {found}")

    # A cache that cannot be reached at all is a miss too (a closed loopback port).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with grpc.insecure_channel(closed) as channel:
        found = lookup(pb_grpc.SessionCacheStub(channel), "py-token-fallback", idp)
    expect("lookup() with the cache unreachable asks the identity provider",
           found.source == "identity provider" and found.why == "Get failed: UNAVAILABLE",
           f"got {found}")


def store_down(stub) -> None:
    """The server runs on Redis, and Redis is stopped: Get and Set degrade to
    UNAVAILABLE, the invalidations fail with gRPC UNAVAILABLE."""
    run = uuid.uuid4().hex[:12]
    idp = IdentityProvider(f"py-user-{run}")
    token = f"py-token-{run}-down"
    started = time.monotonic()
    got = stub.Get(pb.GetRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Get with the store down answers UNAVAILABLE without a fence",
           got.outcome == pb.GET_OUTCOME_UNAVAILABLE and got.fence == "",
           f"got {outcome_name(pb.GetOutcome, got.outcome)}, fence {got.fence!r}")
    expect("...and promptly", time.monotonic() - started < 2.0,
           f"took {time.monotonic() - started:.2f}s")
    found = lookup(stub, token, idp)
    expect("lookup() treats it as a miss: asks the identity provider, Sets nothing",
           found.source == "identity provider" and found.why == "GET_OUTCOME_UNAVAILABLE"
           and found.set_outcome is None and idp.calls == 1,
           f"got {found}")
    user, expire = idp.validate(token)
    stored = stub.Set(pb.SetRequest(token=token, user=user, session_expire=expire), timeout=CALL_TIMEOUT_S)
    expect("Set with the store down answers UNAVAILABLE", stored.outcome == pb.SET_OUTCOME_UNAVAILABLE,
           f"got {outcome_name(pb.SetOutcome, stored.outcome)}")
    try:
        invalidate_user(stub, user.id, attempts=3)
        raise Unexpected("InvalidateUser with the store down succeeded")
    except grpc.RpcError as err:
        expect("InvalidateUser fails with gRPC UNAVAILABLE after bounded retries",
               err.code() == grpc.StatusCode.UNAVAILABLE, f"got {err.code().name}: {err.details()}")
    try:
        stub.InvalidateToken(pb.InvalidateTokenRequest(token=token), timeout=CALL_TIMEOUT_S)
        raise Unexpected("InvalidateToken with the store down succeeded")
    except grpc.RpcError as err:
        expect("InvalidateToken fails with gRPC UNAVAILABLE",
               err.code() == grpc.StatusCode.UNAVAILABLE, f"got {err.code().name}: {err.details()}")


def main() -> int:
    global pb, pb_grpc
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of a session-cache server")
    parser.add_argument("--store-down", action="store_true",
                        help="expect the server's store (Redis) to be down")
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR,
                        help="the directory holding sessioncache/v1/session_cache.proto")
    args = parser.parse_args()
    pb, pb_grpc = load_stubs(args.proto_dir)

    with grpc.insecure_channel(args.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            print(f"FAIL: no session-cache at {args.address} within {CALL_TIMEOUT_S:.0f}s")
            return 1
        stub = pb_grpc.SessionCacheStub(channel)
        try:
            if args.store_down:
                store_down(stub)
            else:
                flow(stub)
                unavailable_is_a_miss()
        except Unexpected as err:
            print(f"FAIL: {err}")
            return 1
        except grpc.RpcError as err:
            print(f"FAIL: a call failed: {err.code().name}: {err.details()}")
            return 1
    print(f"all checks passed against {args.address}" + (" (store down)" if args.store_down else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
