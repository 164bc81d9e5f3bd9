"""Envoy's Check (envoy.service.auth.v3.Authorization) on each store, driven as Envoy's
ext_authz filter sends it: with grpcurl through server reflection (no .proto files), and
from Python with Envoy's own protos (xds-protos). Allowed with the user's headers exactly
when Validate says VALID; a client's own identity headers overwritten or removed; denied
with 401 for no, unknown and revoked tokens; UNAVAILABLE when the provider is down."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from support import Server, grpcurl
from testkit.appwrite import AppwriteStandIn

AUTHORIZATION = "envoy.service.auth.v3.Authorization"
IDENTITY = ["x-auth-request-user", "x-auth-request-email", "x-auth-request-name",
            "x-auth-request-email-verified", "x-auth-request-tier", "x-auth-request-session-expire"]


def fresh_session(appwrite: AppwriteStandIn) -> tuple[str, str]:
    run_id = uuid.uuid4().hex[:12]
    token, user = f"edge-session-{run_id}", f"edge-user-{run_id}"
    appwrite.add_session(token, user, name="Ada Lovelace", tier="pro")
    return token, user


def envoy_request(headers: dict[str, str]) -> dict:
    """What Envoy's HTTP filter sends, as grpcurl's JSON."""
    return {"attributes": {"request": {"http": {"method": "GET", "path": "/orders", "host": "shop.example.com",
                                                "headers": headers}}}}


def test_check_is_in_reflection_and_health(server):
    """grpcurl lists and describes Authorization with no .proto files; its health name
    follows the store (SERVING here)."""
    listed = grpcurl(server.address, "list")
    assert listed.returncode == 0
    assert AUTHORIZATION in listed.stdout.split()
    described = grpcurl(server.address, "describe", f"{AUTHORIZATION}.Check")
    assert described.returncode == 0
    assert ".envoy.service.auth.v3.CheckRequest" in described.stdout
    assert server.health(AUTHORIZATION) == "SERVING"


def grpcurl_check(server: Server, headers: dict[str, str]) -> dict:
    done = grpcurl(server.address, f"{AUTHORIZATION}/Check", data=envoy_request(headers))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_grpcurl_check_allows_a_valid_token_with_the_users_headers(server, appwrite):
    """A valid token: OK, the six identity headers set with overwrite (append false), the
    client's own x-auth-request-user overwritten and its x-auth-request-groups removed."""
    token, user = fresh_session(appwrite)
    answer = grpcurl_check(server, {"authorization": f"Bearer {token}", "x-auth-request-user": "admin",
                                    "x-auth-request-groups": "admins"})
    assert answer.get("status", {}).get("code", 0) == 0
    ok = answer["okResponse"]
    set_headers = {h["header"]["key"]: h["header"]["value"] for h in ok["headers"]}
    assert all(h["append"] is False for h in ok["headers"])
    assert set_headers["x-auth-request-user"] == user
    assert set_headers["x-auth-request-email"] == f"{user}@example.com"
    assert sorted(set_headers) == sorted(IDENTITY)
    assert ok["headersToRemove"] == ["x-auth-request-groups"]


def test_grpcurl_check_denies_with_401(server):
    """No token and an unknown token: denied, HTTP 401 with www-authenticate: Bearer."""
    for headers in ({}, {"authorization": "Bearer no-such-session"}, {"authorization": "Bearer"}):
        answer = grpcurl_check(server, headers)
        denied = answer["deniedResponse"]
        assert denied["status"]["code"] == "Unauthorized", headers
        assert {"key": "www-authenticate", "value": "Bearer"} in [h["header"] for h in denied["headers"]]
        assert answer["status"]["code"] == 16  # UNAUTHENTICATED


def stub(server: Server) -> tuple[grpc.Channel, external_auth_pb2_grpc.AuthorizationStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, external_auth_pb2_grpc.AuthorizationStub(channel)


def python_request(headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders", host="shop.example.com",
                                                              headers=headers)
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))


def allowed(answer: external_auth_pb2.CheckResponse) -> bool:
    return answer.WhichOneof("http_response") == "ok_response" and answer.status.code == 0


def revoke(server: Server, appwrite: AppwriteStandIn, token: str, user: str, how: str) -> None:
    """Sign-out (InvalidateToken) or password change (InvalidateUser): at the provider,
    then in the cache, through grpcurl and reflection."""
    appwrite.revoke(token)
    method, body = (("InvalidateToken", {"token": token}) if how == "token"
                    else ("InvalidateUser", {"userId": user}))
    assert grpcurl(server.address, f"sessioncache.v1.SessionCache/{method}", data=body).returncode == 0


@pytest.mark.parametrize("how", ["token", "user"])
def test_python_check_through_a_revocation(server, appwrite, how):
    """With Envoy's protos: allowed while the session lives (then from the cache), denied
    with 401 once revoked by InvalidateToken or InvalidateUser."""
    token, user = fresh_session(appwrite)
    channel, authz = stub(server)
    with channel:
        request = python_request({"authorization": f"Bearer {token}", "x-auth-request-email": "root@example.com"})
        for _ in range(3):
            answer = authz.Check(request, timeout=10)
            assert allowed(answer)
            values = {h.header.key: h.header.value for h in answer.ok_response.headers}
            assert values["x-auth-request-email"] == f"{user}@example.com"
        assert appwrite.validations(token) == 1, "the cache answered the repeats"
        revoke(server, appwrite, token, user, how)
        answer = authz.Check(request, timeout=10)
        assert answer.WhichOneof("http_response") == "denied_response"
        assert answer.denied_response.status.code == 401


def test_python_check_bad_input(server):
    """A CheckRequest without attributes is INVALID_ARGUMENT naming the field; thousands
    of cookies are a denial."""
    channel, authz = stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            authz.Check(external_auth_pb2.CheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("attributes:")
        cookies = "; ".join(f"c{i}=v" for i in range(5000))
        answer = authz.Check(python_request({"cookie": cookies}), timeout=10)
        assert answer.denied_response.status.code == 401


@pytest.fixture(scope="module")
def provider_down(start) -> Server:
    """A server whose identity provider is not listening."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start(Server("check-provider-down", "memory", [
        "--idp", "appwrite", "--appwrite-endpoint", f"http://127.0.0.1:{port}/v1", "--appwrite-project", "p"]))
    server.wait_for("SERVING")
    return server


def test_check_with_the_provider_down_is_unavailable(provider_down):
    """The provider unreachable: gRPC UNAVAILABLE (Envoy's failure_mode_allow: false and
    status_on_error then refuse the request); never an allow."""
    channel, authz = stub(provider_down)
    with channel:
        with pytest.raises(grpc.RpcError) as failed:
            authz.Check(python_request({"authorization": "Bearer anything"}), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    done = grpcurl(provider_down.address, f"{AUTHORIZATION}/Check",
                   data=envoy_request({"authorization": "Bearer anything"}))
    assert done.returncode != 0
    assert "Unavailable" in done.stderr
