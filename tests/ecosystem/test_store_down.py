"""Redis stops under a running server: readiness turns NOT_SERVING (liveness stays
SERVING), the store gauge says so, and the clients degrade as the API promises (their
--store-down flows). These tests have a Redis and a server of their own, so that
stopping Redis breaks nothing the other modules use."""

from __future__ import annotations

import re

import pytest

from support import Redis, Server, node_client, python_client, run


@pytest.fixture(scope="module")
def stopped(start) -> Server:
    """A server whose Redis was SERVING, then stopped."""
    redis = start(Redis("stopped"))
    server = start(Server("redis-stopped", "redis", ["--redis-url", f"redis://{redis.address}"]))
    server.wait_for("SERVING")
    redis.stop()
    server.wait_for("NOT_SERVING")
    return server


def test_readiness_not_serving_liveness_serving(stopped):
    """The store's health name is NOT_SERVING; the process's ("") is still SERVING."""
    assert stopped.health() == "NOT_SERVING"
    assert stopped.health("") == "SERVING"


def test_store_up_gauge_is_zero(stopped):
    """session_cache_store_up reads 0, which SessionCacheNotServing alerts on."""
    scrape = stopped.scrape()
    assert re.search(r"^session_cache_store_up 0$", scrape, re.M), scrape


def test_python_client_store_down(stopped):
    """client.py --store-down: Gets answer UNAVAILABLE, the caller asks the IdP."""
    assert run(python_client(stopped.address, "--store-down")).returncode == 0


def test_node_client_store_down(stopped):
    """client.js --store-down: the same from Node.js."""
    assert run(node_client(stopped.address, "--store-down")).returncode == 0
