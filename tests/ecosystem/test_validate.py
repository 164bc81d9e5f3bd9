"""Validate, the one-call flow, on each store against the Appwrite stand-in: the example
clients' --validate flows, and concurrent Validates of one token. The provider calls
are counted at the stand-in: each Validate that asks Appwrite sends one GET /v1/account
and one GET /v1/account/sessions/current."""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter

import grpc
import pytest

from support import SERVICE, Server, node_client, python_client, run
from testkit.appwrite import ACCOUNT, CURRENT_SESSION, AppwriteStandIn

CLIENTS = {"python": python_client, "node": node_client}
# client.py's and client.js's REPEATS: Validates of the known token after the first.
REPEATS = 3


def fresh_session(appwrite: AppwriteStandIn, who: str) -> tuple[str, str]:
    """A new session secret the stand-in honours, and its user's id."""
    run_id = uuid.uuid4().hex[:12]
    token, user = f"{who}-session-{run_id}", f"{who}-user-{run_id}"
    appwrite.add_session(token, user)
    return token, user


def statuses(calls, path: str, secret: str, method: str = "GET") -> list[int]:
    return [c.status for c in calls if c.path == path and c.secret == secret and c.method == method]


@pytest.mark.parametrize("client", CLIENTS)
def test_client_one_call_flow(client, server, appwrite):
    """client.py / client.js --validate: VALID (1 + REPEATS + 1 Validates of the known
    token: one provider call), INVALID for an unknown token (3 Validates: one provider
    call, then the negative cache), the session signed out at the stand-in and in the
    cache, then INVALID (one call, refused)."""
    token, user = fresh_session(appwrite, f"{client}-{server.store}")
    mark = appwrite.mark()
    done = run(CLIENTS[client](server.address, "--validate", token, "--expect-user", user,
                               "--appwrite-endpoint", appwrite.endpoint, "--appwrite-project", appwrite.project))
    assert done.returncode == 0
    assert "all checks passed" in done.stdout
    calls = appwrite.since(mark)
    print("stand-in calls:", *calls, sep="\n  ")

    # The known token: one call while the session was live, however many Validates.
    assert statuses(calls, ACCOUNT, token) == [200, 401]
    assert statuses(calls, CURRENT_SESSION, token) == [200, 401]
    assert statuses(calls, CURRENT_SESSION, token, "DELETE") == [204]
    # The unknown token: asked once, whatever the client asked after (negative cache).
    refused = Counter(c.secret for c in calls if c.path == ACCOUNT and c.secret != token)
    assert list(refused.values()) == [1], refused
    assert all(c.status == 401 for c in calls if c.secret != token)
    assert len(calls) == 2 * 2 + 1 + 2, "nothing else reached the provider"


VALIDATE = f"/{SERVICE}/Validate"
OUTCOMES = {1: "VALID", 2: "INVALID", 3: "UNAVAILABLE"}


def validate_raw(channel: grpc.Channel, token: str) -> str:
    """Validate with the message encoded by hand (ValidateRequest.token is field 1),
    so that no stubs are needed; the outcome's name (ValidateResponse.outcome, field 1)."""
    data = token.encode()
    assert len(data) < 128
    answer = channel.unary_unary(VALIDATE)(b"\x0a" + bytes([len(data)]) + data, timeout=10)
    if not answer.startswith(b"\x08"):
        return "UNSPECIFIED"
    return OUTCOMES.get(answer[1], f"unknown {answer[1]}")


def concurrent_validates(address: str, token: str, n: int) -> list[str]:
    barrier = threading.Barrier(n)
    outcomes: list[str] = [""] * n

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=5)
            barrier.wait()
            outcomes[i] = validate_raw(channel, token)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def joins(server) -> float:
    found = re.search(r"^session_cache_validate_joins_total (\S+)$", server.scrape(), re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("known", [True, False], ids=["known", "refused"])
def test_concurrent_validates_share_one_provider_call(known, server, appwrite):
    """16 Validates of one uncached token at once, with Appwrite taking 300 ms to answer:
    one provider call (single flight), and all 16 answer alike."""
    n = 16
    if known:
        token, _ = fresh_session(appwrite, f"burst-{server.store}")
    else:
        token = f"burst-unknown-{server.store}-{uuid.uuid4().hex[:12]}"
    mark, joined = appwrite.mark(), joins(server)
    appwrite.delay_s = 0.3
    try:
        outcomes = concurrent_validates(server.address, token, n)
    finally:
        appwrite.delay_s = 0.0
    assert outcomes == ["VALID" if known else "INVALID"] * n
    calls = appwrite.since(mark)
    assert statuses(calls, ACCOUNT, token) == [200 if known else 401]
    assert statuses(calls, CURRENT_SESSION, token) == [200 if known else 401]
    assert joins(server) > joined, "no Validate joined the call in progress"


def test_provider_misconfigured_is_unavailable(start, appwrite):
    """A server whose --appwrite-project Appwrite does not know (404 project_not_found):
    Validate of a session Appwrite would honour answers UNAVAILABLE, never VALID nor
    INVALID, and caches nothing (the next Validate asks again)."""
    flags = ["--idp", "appwrite", "--appwrite-endpoint", appwrite.endpoint, "--appwrite-project", "no-such-project"]
    server = start(Server("validate-wrong-project", "memory", flags))
    server.wait_for("SERVING")
    mark = appwrite.mark()
    try:
        with grpc.insecure_channel(server.address) as channel:
            outcomes = [validate_raw(channel, "my-session-token") for _ in range(2)]
    finally:
        server.stop()
    assert outcomes == ["UNAVAILABLE", "UNAVAILABLE"]
    assert statuses(appwrite.since(mark), ACCOUNT, "my-session-token") == [404, 404]
