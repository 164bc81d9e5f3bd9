"""grpc.health.v1 as a Kubernetes probe or a load balancer sees it, through the example
health checker (examples/clients/python/health_check.py)."""

from __future__ import annotations

import sys

from support import PY_CLIENTS, run


def test_health_checker(server):
    """Liveness and readiness SERVING, an unknown name NOT_FOUND, Watch streams SERVING."""
    done = run([sys.executable, str(PY_CLIENTS / "health_check.py"), server.address,
                "--timeout", "10"])
    assert done.returncode == 0
