"""The example clients (examples/clients/) run their caller flow against each store, and
the Python service's own Redis layout is shared with session-cache."""

from __future__ import annotations

import sys

from support import PY_CLIENTS, node_client, python_client, run


def test_python_client(server):
    """client.py's flow (miss, Set with the fence, hit, revocations) holds on this store."""
    done = run(python_client(server.address))
    assert done.returncode == 0


def test_node_client(server):
    """client.js's flow holds on this store (@grpc/grpc-js, stubs from the proto)."""
    done = run(node_client(server.address))
    assert done.returncode == 0


def test_python_service_layout_shared(servers, redis):
    """seed_compat.py: the Python service and session-cache read each other's entries and
    invalidations in one Redis."""
    done = run([sys.executable, str(PY_CLIENTS / "seed_compat.py"),
                servers["redis"].address, redis.address])
    assert done.returncode == 0
