"""Revocations pushed by the identity provider (SPEC §12) wired as an operator wires them,
against the built binary on Redis:

- an Appwrite webhook delivery made with a shell's tools: the body as Appwrite's worker
  writes it (PHP's json_encode: `/` escaped), signed with `openssl dgst -sha1 -hmac` over
  the webhook's URL followed by the body, sent with `curl --data-binary`;
- a back-channel logout token made with PyJWT, RS256, its key published as a JSON Web Key
  Set by a small HTTP server standing for Keycloak, posted with `curl -d`.

Each takes a session that Validate had cached out: the next Validate asks the Appwrite
stand-in again. The operator-facing answers (401 for a bad signature, 400 for a replayed
token, Cache-Control: no-store) and the metrics are checked as scraped."""

from __future__ import annotations

import base64
import http.server
import json
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from test_validate import fresh_session, validate_raw

from support import WORK, Redis, Server, free_port

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
AUDIENCE = "session-cache"


class KeySet:
    """An OpenID provider's signing key and its JWKS endpoint, on a free loopback port."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        public.update({"kid": "kc-1", "use": "sig", "alg": "RS256"})
        body = json.dumps({"keys": [public]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        self.issuer = f"http://127.0.0.1:{port}/realms/main"
        self.jwks_url = f"{self.issuer}/protocol/openid-connect/certs"

    def logout_token(self, sub: str) -> str:
        """A logout token as Keycloak sends one: sub and sid, the logout event, a jti."""
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "iat": now, "exp": now + 120,
                  "jti": str(uuid.uuid4()), "sub": sub, "sid": str(uuid.uuid4()),
                  "events": {BACKCHANNEL_EVENT: {}}}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "kc-1", "typ": "logout+jwt"})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pushed(start):
    """A server on Redis with the HTTP listener, an Appwrite webhook and back-channel
    logout configured; its webhook key written to a file as a Secret would be."""
    keys = KeySet()
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


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """curl's status, headers (lowercase names) and body."""
    done = subprocess.run(["curl", "-sS", "-i", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    print("$ curl", *args, "\n", done.stdout, done.stderr)
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return status, headers, body


def sign(body_file: Path, url: str, key: str) -> str:
    """base64(HMAC-SHA1(key, url . body)) with the shell's tools, as an operator checks it."""
    url_and_body = body_file.with_suffix(".signed")
    url_and_body.write_bytes(url.encode() + body_file.read_bytes())
    digest = subprocess.run(["openssl", "dgst", "-sha1", "-hmac", key, "-binary", str(url_and_body)],
                            capture_output=True, check=True, timeout=10).stdout
    return base64.b64encode(digest).decode()


def events(user: str, session: str) -> str:
    """X-Appwrite-Webhook-Events of a sign-out, as Appwrite lists them."""
    names = [f"users.{u}.sessions.{s}.delete" for u, s in
             ((user, session), ("*", "*"), (user, "*"), ("*", session))]
    names += [f"users.{u}.sessions.{s}" for u, s in ((user, session), ("*", "*"), (user, "*"), ("*", session))]
    return ",".join([*names, f"users.{user}", "users.*"])


def validate(server: Server, token: str) -> str:
    with grpc.insecure_channel(server.address) as channel:
        return validate_raw(channel, token)


def test_a_signed_webhook_from_curl_revokes(pushed, appwrite, tmp_path):
    """A sign-out delivered as Appwrite delivers it: 200 revoked; the cached session is
    asked about again. The same body signed with another key: 401, nothing revoked."""
    server = pushed["server"]
    token, user = fresh_session(appwrite, "webhook")
    assert validate(server, token) == "VALID"
    assert validate(server, token) == "VALID"
    assert appwrite.validations(token) == 1, "the second Validate was not a hit"

    payload = {"$id": "session-1", "userId": user, "provider": "email",
               "providerUid": f"{user}@example.com", "osName": "Linux", "clientName": "Firefox",
               "deviceName": "desktop", "countryName": "Österreich", "url": "https://app.example/x"}
    body = tmp_path / "body.json"
    # PHP's json_encode: no spaces, "/" escaped, non-ASCII as \\u escapes.
    body.write_text(json.dumps(payload, separators=(",", ":")).replace("/", "\\/"))
    headers = ["-H", "Content-Type: application/json",
               "-H", f"X-Appwrite-Webhook-Events: {events(user, 'session-1')}",
               "-H", "X-Appwrite-Webhook-User-Id: admin-7"]
    forged = sign(body, pushed["url"], "not the key")
    status, _, answer = curl("-X", "POST", pushed["url"], *headers,
                             "-H", f"X-Appwrite-Webhook-Signature: {forged}", "--data-binary", f"@{body}")
    assert status == 401, answer
    assert validate(server, token) == "VALID"
    assert appwrite.validations(token) == 1, "a forged webhook revoked"

    appwrite.revoke(token)
    signature = sign(body, pushed["url"], pushed["key"])
    status, _, answer = curl("-X", "POST", pushed["url"], *headers,
                             "-H", f"X-Appwrite-Webhook-Signature: {signature}", "--data-binary", f"@{body}")
    assert status == 200, answer
    assert json.loads(answer) == {"status": "revoked"}
    assert validate(server, token) == "INVALID"
    assert appwrite.validations(token) == 2, "Validate did not ask Appwrite again"


def test_a_backchannel_logout_token_from_pyjwt_revokes(pushed, appwrite):
    """A logout token signed with PyJWT: 200 with Cache-Control: no-store; the cached
    session is asked about again. The same token again: 400 (its jti was seen)."""
    server, keys = pushed["server"], pushed["keys"]
    token, user = fresh_session(appwrite, "backchannel")
    assert validate(server, token) == "VALID"
    logout = keys.logout_token(user)
    url = f"http://127.0.0.1:{pushed['port']}/backchannel-logout"
    status, headers, answer = curl("-X", "POST", url, "-d", f"logout_token={logout}")
    assert status == 200, answer
    assert headers.get("cache-control") == "no-store"
    assert validate(server, token) == "VALID", "the provider still honours the session"
    assert appwrite.validations(token) == 2, "Validate did not ask Appwrite again"

    status, headers, answer = curl("-X", "POST", url, "-d", f"logout_token={logout}")
    assert status == 400, answer
    assert headers.get("cache-control") == "no-store"
    error = json.loads(answer)
    assert error["error"] == "invalid_request", error
    assert "jti" in error["error_description"], error


def test_pushed_revocations_are_counted(pushed):
    """The listener's and the revocations' series, as Prometheus scrapes them (after the
    two tests above, or at 0 when run alone)."""
    text = pushed["server"].scrape()
    for family, labels in [
        ("session_cache_http_requests_total", ('path="/webhooks/appwrite"', 'status="503"')),
        ("session_cache_http_requests_total", ('path="/backchannel-logout"', 'status="400"')),
        ("session_cache_pushed_revocations_total", ('source="appwrite"', 'outcome="revoked"')),
        ("session_cache_pushed_revocations_total", ('source="backchannel"', 'outcome="unavailable"')),
        ("session_cache_oidc_jwks_fetches_total", ('result="failed"',)),
    ]:
        pattern = re.escape(family) + r"\{[^}]*\}"
        lines = [line for line in text.splitlines()
                 if re.match(pattern, line) and all(label in line for label in labels)]
        assert lines, f"no {family} {labels} in the scrape"
