"""Fixtures for the ecosystem tests: redis-server and session-cache on free loopback
ports, started once per session (or per module, for tests that break them) and stopped
by process id when their scope ends. The processes themselves are in support.py.

Every session-cache started here asks the session's Appwrite stand-in
(tests/testkit/appwrite.py) on a Validate miss, so Validate works in every test.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator

import pytest

from support import AUDIENCE, STORES, WORK, Redis, Server, free_port
from testkit.appwrite import AppwriteStandIn, readme_session
from testkit.oidc import KeySet


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM (a timeout, CI stopping the run) ends the session as Ctrl-C does, so that
    the fixtures' finalizers stop the processes they started."""
    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(scope="session")
def appwrite() -> Iterator[AppwriteStandIn]:
    """The Appwrite stand-in every server asks, holding the README's session
    (my-session-token, user-42's); tests add sessions of their own to it."""
    stand_in = AppwriteStandIn().start()
    readme_session(stand_in)
    yield stand_in
    stand_in.stop()


@pytest.fixture(scope="session")
def start(appwrite) -> Iterator[Callable]:
    """start(thing) starts a Redis or a Server and stops it when the session ends
    (modules that need their own processes stop them earlier themselves). A Server
    without --idp of its own gets the Appwrite stand-in's flags."""
    started = []

    def _start(thing):
        if isinstance(thing, Server) and "--idp" not in thing.flags:
            thing.flags = [*thing.flags, *appwrite.flags()]
        started.append(thing)
        return thing.start()

    yield _start
    for thing in reversed(started):
        thing.stop()


@pytest.fixture(scope="session")
def redis(start) -> Redis:
    return start(Redis("shared"))


@pytest.fixture(scope="session")
def servers(start, redis) -> dict[str, Server]:
    """One server on the in-memory store and one on the shared Redis, both SERVING."""
    found = {
        "memory": start(Server("memory", "memory")),
        "redis": start(Server("redis", "redis", ["--redis-url", f"redis://{redis.address}"])),
    }
    for server in found.values():
        server.wait_for("SERVING")
    return found


@pytest.fixture(params=STORES)
def server(request, servers) -> Server:
    """Each test that takes it runs once per store."""
    return servers[request.param]


@pytest.fixture(scope="session")
def pushed(start):
    """A server on its own Redis with the HTTP listener, an Appwrite webhook and
    back-channel logout configured (SPEC §12); its webhook key written to a file as a
    Secret would be."""
    keys = KeySet(audience=AUDIENCE)
    directory = WORK / "pushed"
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / "webhook-signature-key"
    webhook_key = uuid.uuid4().hex * 4
    key_file.write_text(webhook_key + "\n")
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}/webhooks/appwrite"
    redis = start(Redis("pushed"))
    server = start(Server("pushed", "redis", [
        "--redis-url", f"redis://{redis.address}", "--http-listen", f"127.0.0.1:{http_port}",
        "--appwrite-webhook-key-file", str(key_file), "--appwrite-webhook-url", url,
        "--oidc-issuer", keys.issuer, "--oidc-audience", AUDIENCE, "--oidc-jwks-url", keys.jwks_url]))
    server.wait_for("SERVING")
    yield {"server": server, "url": url, "key": webhook_key, "keys": keys, "port": http_port}
    keys.stop()
