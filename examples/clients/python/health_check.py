#!/usr/bin/env python3
"""Health checker for session-cache, over the standard grpc.health.v1 service
(grpcio-health-checking), as a Kubernetes gRPC probe or a load balancer sees it.

    python health_check.py HOST:PORT [--timeout SECONDS]

Checks that Check("") (the process: liveness) and Check("sessioncache.v1.SessionCache")
(the store: readiness) answer SERVING, that a name the server does not know answers
NOT_FOUND, and that Watch("sessioncache.v1.SessionCache") streams SERVING within the
timeout. Exits 0 when all hold, 1 otherwise, printing what it saw.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "sessioncache.v1.SessionCache"
SERVING = health_pb2.HealthCheckResponse.SERVING


def status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def check(stub, service: str, timeout: float) -> tuple[bool, str]:
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as err:
        return False, f"Check({service!r}) failed: {err.code().name}: {err.details()}"
    return answer.status == SERVING, f"Check({service!r}) -> {status_name(answer.status)}"


def check_unknown(stub, timeout: float) -> tuple[bool, str]:
    name = "no.such.Service"
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.NOT_FOUND, f"Check({name!r}) -> {err.code().name}"
    return False, f"Check({name!r}) -> {status_name(answer.status)}, expected NOT_FOUND"


def watch(stub, service: str, timeout: float) -> tuple[bool, str]:
    """Reads the Watch stream until SERVING arrives or the timeout passes."""
    call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    seen = []
    try:
        for update in call:
            seen.append(status_name(update.status))
            if update.status == SERVING:
                return True, f"Watch({service!r}) -> {' -> '.join(seen)}"
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, f"Watch({service!r}) failed: {err.code().name}: {err.details()}"
    finally:
        call.cancel()
    return False, f"Watch({service!r}) saw {seen or 'nothing'}, no SERVING within {timeout:.0f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of a session-cache server")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds for each check and for the Watch (default 10)")
    args = parser.parse_args()

    started = time.monotonic()
    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        results = [
            check(stub, "", args.timeout),
            check(stub, SERVICE, args.timeout),
            check_unknown(stub, args.timeout),
            watch(stub, SERVICE, args.timeout),
        ]
    for ok, what in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    failed = sum(1 for ok, _ in results if not ok)
    print(f"{args.address}: {'healthy' if not failed else f'{failed} check(s) failed'}"
          f" ({time.monotonic() - started:.2f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
