#!/usr/bin/env python3
"""Example session-cache caller in Python (grpcio).

Shows how a service puts session-cache in front of its identity provider, and checks
that the server answers as the API promises. The stubs are generated from
../../../proto at start-up into a temporary directory, so nothing generated is kept.

    python client.py HOST:PORT --validate TOKEN  # the one-call flow (server with --idp)
    python client.py HOST:PORT                   # the Get/Set flow (exit 0 when all is as expected)
    python client.py HOST:PORT --store-down      # the Get/Set flow while the server's Redis is down

The one-call flow, the recommended way: `validate()` is the helper a real service
calls on every request. It sends Validate(token); the server answers from its cache or,
on a miss, asks the identity provider it was started with (--idp) and caches the answer.
VALID gives the user; INVALID means answer 401 to the end user; UNAVAILABLE, or the
cache unreachable, means answer 503 (retryable): never treat the token as valid. With
--validate TOKEN (a session the server's identity provider honours) the client checks:
Validate -> VALID with the user; again -> VALID (from the cache); an unknown token ->
INVALID, twice (the second from the negative cache); `logout()` (the session signed out
at Appwrite when --appwrite-endpoint is given, then InvalidateToken) -> Validate answers
INVALID.

The Get/Set flow, for callers that validate with the identity provider themselves: Get
misses and hands out a fence; the caller validates the token with the identity provider
and Sets the session with that fence; Get hits; InvalidateUser (a password change) hides
the session; a Set whose validation began before the password change is refused as
STALE; InvalidateToken (a logout) deletes the session and refuses a late Set as REVOKED.
`lookup()` is the helper such a service would call on every request: it treats
UNAVAILABLE, DISABLED and an unreachable cache as "ask the identity provider". Any
unexpected answer is printed and the exit status is 1.
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
import urllib.error
import urllib.request
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


# --- the one-call flow: what a service does on each request ---------------------------


class Unauthenticated(Exception):
    """The token is no valid session: answer the end user 401."""


class RetryLater(Exception):
    """Nobody could say whether the token is valid (the identity provider or the cache
    could not answer): answer the end user 503, a retryable error. Never let the request
    through."""


@dataclass
class Validated:
    user: object
    session_expire: Timestamp


def validate(stub, token: str) -> Validated:
    """Who the session token belongs to, in one call: session-cache answers from its
    cache or asks the identity provider it is configured with (--idp).

    VALID returns the user. INVALID (the provider refused the token, now or within
    --negative-ttl-seconds) raises Unauthenticated: 401. UNAVAILABLE (the provider could
    not be asked), an unknown outcome and a failed call (the cache unreachable, or
    FAILED_PRECONDITION: the server has no --idp) raise RetryLater: 503. A token the
    server refuses as malformed (INVALID_ARGUMENT: empty, over 4 KiB) is no session
    either: Unauthenticated."""
    try:
        answer = stub.Validate(pb.ValidateRequest(token=token), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise Unauthenticated(f"Validate refused the token: {err.details()}") from err
        raise RetryLater(f"Validate failed: {err.code().name}") from err
    if answer.outcome == pb.VALIDATE_OUTCOME_VALID:
        return Validated(answer.user, answer.session_expire)
    if answer.outcome == pb.VALIDATE_OUTCOME_INVALID:
        raise Unauthenticated("VALIDATE_OUTCOME_INVALID")
    raise RetryLater(outcome_name(pb.ValidateOutcome, answer.outcome))


def status_for(stub, token: str) -> tuple[int, object]:
    """validate() as an HTTP handler uses it: (200, user), (401, None) or (503, None)."""
    try:
        return 200, validate(stub, token).user
    except Unauthenticated:
        return 401, None
    except RetryLater:
        return 503, None


@dataclass
class Appwrite:
    """Where the service's Appwrite is, for signing a session out there at logout."""

    endpoint: str  # https://cloud.appwrite.io/v1
    project: str


def sign_out_at_appwrite(token: str, appwrite: Appwrite) -> None:
    """DELETE /account/sessions/current as the session's owner; 401 means Appwrite no
    longer knows the session, which is what was wanted."""
    request = urllib.request.Request(
        f"{appwrite.endpoint.rstrip('/')}/account/sessions/current", method="DELETE",
        headers={"X-Appwrite-Project": appwrite.project, "X-Appwrite-Session": token,
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as err:
        if err.code != 401:
            raise


def logout(stub, token: str, appwrite: Appwrite | None, attempts: int = 3):
    """Logs a session out: at the identity provider (when given), then InvalidateToken,
    retried on gRPC UNAVAILABLE (the store did not acknowledge it). The cache is
    invalidated even when the provider could not be reached (that error is raised
    after). Returns InvalidateToken's answer."""
    failure = None
    if appwrite is not None:
        try:
            sign_out_at_appwrite(token, appwrite)
        except OSError as err:  # urllib's HTTPError and URLError
            failure = err
    for attempt in range(1, attempts + 1):
        try:
            gone = stub.InvalidateToken(pb.InvalidateTokenRequest(token=token), timeout=CALL_TIMEOUT_S)
            break
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
    if failure is not None:
        raise failure
    return gone


# --- the Get/Set flow: for callers that validate with the identity provider themselves -
# The identity provider, simulated, then what such a service does on each request.


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


# --- the checks: the one-call flow ------------------------------------------------------

REPEATS = 3  # Validates of the known token after the first, all from the cache


def future(stamp: Timestamp) -> bool:
    return stamp.ToDatetime(dt.timezone.utc) > dt.datetime.now(dt.timezone.utc)


def one_call_flow(stub, token: str, expect_user: str | None, appwrite: Appwrite | None) -> None:
    """Validate against a server with --idp; `token` is a session its provider honours."""
    got = stub.Validate(pb.ValidateRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Validate of a known token is VALID with the user",
           got.outcome == pb.VALIDATE_OUTCOME_VALID and got.user.id != ""
           and (expect_user is None or got.user.id == expect_user) and future(got.session_expire),
           f"got {outcome_name(pb.ValidateOutcome, got.outcome)}, user {got.user.id!r}, "
           f"session_expire {got.session_expire.ToJsonString()}")
    print(f"     user {got.user.id} <{got.user.email}> tier {got.user.tier!r}, "
          f"session until {got.session_expire.ToJsonString()}")
    for _ in range(REPEATS):
        again = validate(stub, token)
        expect("validate() of it again is VALID, the same user and expiry (from the cache)",
               same_user(again.user, got.user) and again.session_expire == got.session_expire,
               f"got {again}")
    expect("status_for() of it is 200 with the user", status_for(stub, token) == (200, got.user),
           f"got {status_for(stub, token)}")

    unknown = f"py-unknown-{uuid.uuid4().hex[:12]}"
    for attempt in ("", " again (from the negative cache)"):
        answer = stub.Validate(pb.ValidateRequest(token=unknown), timeout=CALL_TIMEOUT_S)
        expect(f"Validate of an unknown token{attempt} is INVALID, with no user",
               answer.outcome == pb.VALIDATE_OUTCOME_INVALID and not answer.HasField("user"),
               f"got {outcome_name(pb.ValidateOutcome, answer.outcome)}")
    expect("status_for() of the unknown token is 401", status_for(stub, unknown) == (401, None),
           f"got {status_for(stub, unknown)}")

    where = "at Appwrite and in the cache" if appwrite else "in the cache"
    gone = logout(stub, token, appwrite)
    expect(f"logout() signs the session out {where}; InvalidateToken deletes the cached entry",
           gone.deleted, f"got {gone}")
    answer = stub.Validate(pb.ValidateRequest(token=token), timeout=CALL_TIMEOUT_S)
    expect("Validate after the logout is INVALID", answer.outcome == pb.VALIDATE_OUTCOME_INVALID,
           f"got {outcome_name(pb.ValidateOutcome, answer.outcome)}")
    try:
        validate(stub, token)
        raise Unexpected("validate() after the logout returned a user")
    except Unauthenticated:
        expect("validate() after the logout raises Unauthenticated (401)", True, "")


class FakeValidate:
    """A stand-in stub whose Validate answers one outcome, to show validate() on answers
    a healthy server with a healthy provider does not give."""

    def __init__(self, outcome: int):
        self.outcome = outcome

    def Validate(self, request, timeout=None):
        return pb.ValidateResponse(outcome=self.outcome)


def unavailable_is_retryable() -> None:
    for outcome in (pb.VALIDATE_OUTCOME_UNAVAILABLE, pb.VALIDATE_OUTCOME_UNSPECIFIED):
        name = pb.ValidateOutcome.Name(outcome)
        expect(f"validate() on {name} raises RetryLater (503), never a user",
               status_for(FakeValidate(outcome), "py-token-fallback") == (503, None),
               f"got {status_for(FakeValidate(outcome), 'py-token-fallback')}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with grpc.insecure_channel(closed) as channel:
        try:
            validate(pb_grpc.SessionCacheStub(channel), "py-token-fallback")
            raise Unexpected("validate() with the cache unreachable returned a user")
        except RetryLater as err:
            expect("validate() with the cache unreachable raises RetryLater (503)",
                   str(err) == "Validate failed: UNAVAILABLE", f"got {err}")


# --- the checks: the Get/Set flow -------------------------------------------------------


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
    parser.add_argument("--validate", metavar="TOKEN",
                        help="run the one-call flow (Validate) with TOKEN, a session the server's "
                             "identity provider honours; the server needs --idp")
    parser.add_argument("--expect-user", metavar="ID",
                        help="with --validate: the user id TOKEN belongs to")
    parser.add_argument("--appwrite-endpoint", metavar="URL",
                        help="with --validate: Appwrite's endpoint (with /v1), where logout() signs "
                             "the session out before InvalidateToken")
    parser.add_argument("--appwrite-project", metavar="ID", help="with --appwrite-endpoint: the project ID")
    parser.add_argument("--store-down", action="store_true",
                        help="expect the server's store (Redis) to be down (the Get/Set flow)")
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR,
                        help="the directory holding sessioncache/v1/session_cache.proto")
    args = parser.parse_args()
    if args.validate is not None and args.store_down:
        parser.error("--validate and --store-down are different flows: give one")
    if bool(args.appwrite_endpoint) != bool(args.appwrite_project):
        parser.error("--appwrite-endpoint and --appwrite-project go together")
    appwrite = Appwrite(args.appwrite_endpoint, args.appwrite_project) if args.appwrite_endpoint else None
    pb, pb_grpc = load_stubs(args.proto_dir)

    with grpc.insecure_channel(args.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            print(f"FAIL: no session-cache at {args.address} within {CALL_TIMEOUT_S:.0f}s")
            return 1
        stub = pb_grpc.SessionCacheStub(channel)
        try:
            if args.validate is not None:
                one_call_flow(stub, args.validate, args.expect_user, appwrite)
                unavailable_is_retryable()
            elif args.store_down:
                store_down(stub)
            else:
                flow(stub)
                unavailable_is_a_miss()
        except (Unexpected, Unauthenticated, RetryLater, OSError) as err:
            print(f"FAIL: {type(err).__name__}: {err}")
            return 1
        except grpc.RpcError as err:
            print(f"FAIL: a call failed: {err.code().name}: {err.details()}")
            return 1
    mode = " (one-call flow)" if args.validate is not None else " (store down)" if args.store_down else ""
    print(f"all checks passed against {args.address}{mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
