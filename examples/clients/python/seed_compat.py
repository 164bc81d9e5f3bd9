#!/usr/bin/env python3
"""Checks that session-cache and the Python service it replaces share one Redis.

Run against a session-cache on Redis, with the same Redis's address:

    python seed_compat.py SERVICE_HOST:PORT REDIS_HOST:PORT

It plays the Python service's side with the Python service's own steps (redis-py,
json, datetime.fromisoformat, time.time()):
1. session-cache Sets a session; the Python side reads it back and rebuilds the user
   exactly as the Python service's get() does;
2. the Python side caches a session as the Python service's set() does; session-cache's
   Get answers HIT with the same user;
3. the Python side invalidates the user as its invalidate_user() does; session-cache's
   Get answers INVALIDATED for both sessions;
4. session-cache invalidates another user; the Python side's get() rejects that
   user's entry.
Exit status 0 when all hold; the first failure is printed.
"""

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path

import grpc
import redis

sys.path.insert(0, str(Path(__file__).parent))
import client  # stub generation and timestamp helpers

SESSION_CACHE_PREFIX = "session_cache:"
USER_INVALIDATION_PREFIX = "user_invalidated:"


def cache_key(token):
    return SESSION_CACHE_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:32]


def python_get(r, token):
    """The Python service's get(): None on a miss, an expired or invalidated entry."""
    cached = r.get(cache_key(token))
    if cached is None:
        return None
    data = json.loads(cached)
    expire = dt.datetime.fromisoformat(data["session_expire"])
    if expire.tzinfo is None:
        expire = expire.replace(tzinfo=dt.timezone.utc)
    if expire < dt.datetime.now(dt.timezone.utc):
        return None
    invalidated_at = r.get(USER_INVALIDATION_PREFIX + data["user_id"])
    if invalidated_at and float(invalidated_at) > data.get("cached_at", 0):
        return None
    return {
        "id": data["user_id"], "email": data["email"], "name": data["name"],
        "email_verified": data["email_verified"], "tier": data["tier"],
        "created_at": dt.datetime.fromisoformat(data["created_at"]),
        "updated_at": dt.datetime.fromisoformat(data["updated_at"]),
    }


def python_set(r, token, user, session_expire, ttl_seconds=300):
    """The Python service's set(), with datetime values as UserData holds them."""
    remaining = (session_expire - dt.datetime.now(dt.timezone.utc)).total_seconds()
    r.set(cache_key(token), json.dumps({
        "user_id": user["id"], "email": user["email"], "name": user["name"],
        "email_verified": user["email_verified"], "tier": user["tier"],
        "created_at": user["created_at"].isoformat(),
        "updated_at": user["updated_at"].isoformat(),
        "session_expire": session_expire.isoformat(),
        "cached_at": time.time(),
    }), ex=min(ttl_seconds, max(1, int(remaining))))


def python_invalidate_user(r, user_id, marker_ttl=2592000):
    r.set(USER_INVALIDATION_PREFIX + user_id, str(time.time()), ex=marker_ttl)


def check(step, condition, detail=""):
    if not condition:
        raise SystemExit(f"FAIL {step}: {detail}")
    print(f"ok   {step}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("service")
    parser.add_argument("redis")
    parser.add_argument("--proto-dir", default=str(Path(__file__).parents[3] / "proto"))
    args = parser.parse_args()
    pb, pb_grpc = client.load_stubs(Path(args.proto_dir))
    stub = pb_grpc.SessionCacheStub(grpc.insecure_channel(args.service))
    host, port = args.redis.rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port))
    run = str(time.time_ns())
    utc = dt.timezone.utc
    created = dt.datetime(2024, 1, 15, 10, 30, tzinfo=utc)
    expire = (dt.datetime.now(utc) + dt.timedelta(hours=1)).replace(microsecond=123456)

    # 1. written by session-cache, read by the Python service
    token, user_id = f"service-wrote-{run}", f"service-user-{run}"
    user = pb.User(id=user_id, email="ada@example.com", name="Adá", email_verified=True,
                   tier="pro", created_at=client.ts(created),
                   updated_at=client.ts(created + dt.timedelta(microseconds=250)))
    miss = stub.Get(pb.GetRequest(token=token))
    stored = stub.Set(pb.SetRequest(token=token, user=user, session_expire=client.ts(expire),
                                    fence=miss.fence))
    check("session-cache stores a session", stored.outcome == pb.SET_OUTCOME_STORED, str(stored))
    seen = python_get(r, token)
    check("the Python service reads it", seen is not None, "python get() returned None")
    check("with the same user", seen["id"] == user_id and seen["name"] == "Adá"
          and seen["email_verified"] is True and seen["tier"] == "pro"
          and seen["created_at"] == created
          and seen["updated_at"] == created + dt.timedelta(microseconds=250), str(seen))
    check("with the TTL applied", 0 < r.ttl(cache_key(token)) <= 300, str(r.ttl(cache_key(token))))

    # 2. written by the Python service (naive datetimes, as UserData may hold), read here
    py_token, py_user = f"python-wrote-{run}", f"python-user-{run}"
    python_set(r, py_token, {"id": py_user, "email": "bo@example.com", "name": "Bo",
                             "email_verified": False, "tier": "free",
                             "created_at": dt.datetime(2023, 5, 1, 8, 0, 0, 500),
                             "updated_at": dt.datetime(2023, 5, 1, 8, 0, 0)}, expire)
    got = stub.Get(pb.GetRequest(token=py_token))
    check("session-cache reads the Python service's entry", got.outcome == pb.GET_OUTCOME_HIT, str(got))
    check("with the same user", got.user.id == py_user and got.user.tier == "free"
          and got.user.created_at.ToDatetime() == dt.datetime(2023, 5, 1, 8, 0, 0, 500), str(got.user))

    # 3. the Python service invalidates both users: session-cache hides both entries
    time.sleep(0.01)
    python_invalidate_user(r, user_id)
    python_invalidate_user(r, py_user)
    for t, writer in ((token, "session-cache"), (py_token, "the Python service")):
        got = stub.Get(pb.GetRequest(token=t))
        check(f"a Python InvalidateUser hides the entry {writer} wrote",
              got.outcome == pb.GET_OUTCOME_INVALIDATED, str(got))

    # 4. session-cache invalidates a user: the Python service stops serving its entry
    other_token, other_user = f"python-other-{run}", f"python-other-user-{run}"
    python_set(r, other_token, {"id": other_user, "email": "c@example.com", "name": "C",
                                "email_verified": True, "tier": "pro",
                                "created_at": created, "updated_at": created}, expire)
    check("the Python service serves its entry", python_get(r, other_token) is not None)
    stub.InvalidateUser(pb.InvalidateUserRequest(user_id=other_user))
    check("a session-cache InvalidateUser hides it from the Python service",
          python_get(r, other_token) is None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
