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
import json
import re
import subprocess
from pathlib import Path

import grpc
from test_validate import fresh_session, validate_raw

from support import Server


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
