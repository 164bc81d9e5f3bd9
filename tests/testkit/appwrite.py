"""A stand-in for Appwrite's account API, the identity provider behind Validate in the
ecosystem tests and the benchmarks (session-cache runs with --idp appwrite
--appwrite-endpoint http://127.0.0.1:<port>/v1 --appwrite-project <id>).

It answers what session-cache asks (src/idp/appwrite.rs), in Appwrite's shapes:
  GET    /v1/account                   the User model ($id, $createdAt, $updatedAt, name,
                                       email, emailVerification, prefs, ...)
  GET    /v1/account/sessions/current  the Session model (userId, expire, current, ...)
  DELETE /v1/account/sessions/current  signs the session out (204, no body), as a
                                       service's logout does at Appwrite
with the session secret in X-Appwrite-Session and the project ID in X-Appwrite-Project.
A secret it does not know, one signed out or one past its expire leaves the request a
guest's, and Appwrite answers 401 general_unauthorized_scope with its error body
{"message", "code", "type", "version"}; a wrong project is 404 project_not_found.

Sessions live in a table (secret -> user and expire) that tests add to and revoke from,
and every request is logged (method, path, secret, status) so that tests can count the
provider calls Validate made: each Validate that asks the provider sends one
GET /v1/account and one GET /v1/account/sessions/current.

    stand_in = AppwriteStandIn().start()
    stand_in.add_session("my-session-token", "user-42", email="ada@example.com")
    stand_in.validations("my-session-token")   # GET /v1/account calls for that secret

Run on its own it serves the README's session (my-session-token -> user-42):
    python3 tests/testkit/appwrite.py [--port 8080]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import json
import threading
import time
from dataclasses import dataclass, field

# The Appwrite version in error bodies, and the response format session-cache asks for.
VERSION = "1.8.0"
PROJECT = "session-cache-eco"
ACCOUNT = "/v1/account"
CURRENT_SESSION = "/v1/account/sessions/current"


def appwrite_time(moment: dt.datetime) -> str:
    """Appwrite's ISO 8601 with milliseconds and an offset: 2024-01-15T10:30:00.000+00:00."""
    moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+00:00"


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Session:
    """One session secret and the user it belongs to."""

    secret: str
    user_id: str
    email: str
    name: str
    email_verified: bool
    tier: str
    created_at: dt.datetime
    updated_at: dt.datetime
    expire: dt.datetime
    session_id: str
    revoked: bool = False

    def live(self, now: dt.datetime) -> bool:
        return not self.revoked and self.expire > now

    def user_model(self) -> dict:
        """Appwrite's User model (src/Appwrite/Utopia/Response/Model/User.php)."""
        return {
            "$id": self.user_id,
            "$createdAt": appwrite_time(self.created_at),
            "$updatedAt": appwrite_time(self.updated_at),
            "name": self.name,
            "registration": appwrite_time(self.created_at),
            "status": True,
            "labels": [],
            "passwordUpdate": appwrite_time(self.created_at),
            "email": self.email,
            "phone": "",
            "emailVerification": self.email_verified,
            "phoneVerification": False,
            "mfa": False,
            "prefs": {"tier": self.tier} if self.tier else {},
            "targets": [],
            "accessedAt": appwrite_time(self.updated_at),
        }

    def session_model(self) -> dict:
        """Appwrite's Session model (.../Model/Session.php), as the session's owner sees it."""
        return {
            "$id": self.session_id,
            "$createdAt": appwrite_time(self.created_at),
            "$updatedAt": appwrite_time(self.created_at),
            "userId": self.user_id,
            "expire": appwrite_time(self.expire),
            "provider": "email",
            "providerUid": self.email,
            "providerAccessToken": "",
            "providerAccessTokenExpiry": "",
            "providerRefreshToken": "",
            "ip": "127.0.0.1",
            "osCode": "", "osName": "", "osVersion": "",
            "clientType": "", "clientCode": "", "clientName": "", "clientVersion": "",
            "clientEngine": "", "clientEngineVersion": "",
            "deviceName": "", "deviceBrand": "", "deviceModel": "",
            "countryCode": "--", "countryName": "Unknown",
            "current": True,
            "factors": ["password"],
            "secret": "",
            "mfaUpdatedAt": "",
        }


@dataclass(frozen=True)
class Call:
    """One request the stand-in answered."""

    method: str
    path: str
    secret: str | None
    status: int


def error_body(code: int, kind: str, message: str) -> dict:
    """Appwrite's error body (app/controllers/general.php, in production mode)."""
    return {"message": message, "code": code, "type": kind, "version": VERSION}


GUEST = (401, "general_unauthorized_scope", "User (role: guests) missing scopes ([\"account\"])")


@dataclass
class AppwriteStandIn:
    """Appwrite's account API on a free loopback port, in a thread of this process."""

    project: str = PROJECT
    # Seconds each answer waits before it goes out: a slow provider, so that concurrent
    # Validates of one token overlap (single flight).
    delay_s: float = 0.0
    sessions: dict[str, Session] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        """What --appwrite-endpoint takes: the API's base URL with its /v1."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def flags(self) -> list[str]:
        """session-cache's flags for this stand-in."""
        return ["--idp", "appwrite", "--appwrite-endpoint", self.endpoint,
                "--appwrite-project", self.project]

    def start(self, port: int = 0) -> AppwriteStandIn:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as reqwest expects of an API

            def do_GET(self):
                stand_in.handle(self)

            def do_DELETE(self):
                stand_in.handle(self)

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="appwrite-stand-in", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- the table ---------------------------------------------------------------------

    def add_session(self, secret: str, user_id: str, *, email: str | None = None, name: str = "Ada Lovelace",
                    email_verified: bool = True, tier: str = "pro",
                    created_at: str = "2024-01-15T10:30:00Z", updated_at: str | None = None,
                    expire: str | None = None) -> Session:
        """A session the stand-in honours; expire defaults to a year from now (Appwrite's
        default session length)."""
        now = dt.datetime.now(dt.timezone.utc)
        session = Session(
            secret=secret, user_id=user_id, email=email if email is not None else f"{user_id}@example.com",
            name=name, email_verified=email_verified, tier=tier, created_at=utc(created_at),
            updated_at=utc(updated_at or created_at),
            expire=utc(expire) if expire else now + dt.timedelta(days=365),
            session_id=f"session-{len(self.sessions) + 1}")
        with self.lock:
            self.sessions[secret] = session
        return session

    def revoke(self, secret: str) -> None:
        """Signs a session out, as DELETE /v1/account/sessions/current does."""
        with self.lock:
            self.sessions[secret].revoked = True

    # --- the counts --------------------------------------------------------------------

    def mark(self) -> int:
        """Where the log is now; since(mark) gives what came after."""
        with self.lock:
            return len(self.calls)

    def since(self, mark: int) -> list[Call]:
        with self.lock:
            return self.calls[mark:]

    def requests(self, secret: str | None = None, path: str | None = None, method: str = "GET",
                 status: int | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls
                    if c.method == method and (secret is None or c.secret == secret)
                    and (path is None or c.path == path) and (status is None or c.status == status)]

    def validations(self, secret: str | None = None, status: int | None = None) -> int:
        """Provider calls Validate made (for `secret`): one GET /v1/account each, beside
        its GET /v1/account/sessions/current. `status` 200 counts those Appwrite
        answered for a live session, 401 those it refused."""
        return len(self.requests(secret, ACCOUNT, status=status))

    # --- the API -----------------------------------------------------------------------

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        secret = request.headers.get("X-Appwrite-Session")
        if self.delay_s:
            time.sleep(self.delay_s)
        status, body = self.answer(request.command, path, request.headers.get("X-Appwrite-Project"), secret)
        with self.lock:
            self.calls.append(Call(request.command, path, secret, status))
        data = b"" if body is None else json.dumps(body).encode()
        request.send_response(status)
        if body is not None:  # a 204 has neither
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def answer(self, method: str, path: str, project: str | None, secret: str | None) -> tuple[int, dict | None]:
        if path not in (ACCOUNT, CURRENT_SESSION) or (method == "DELETE" and path != CURRENT_SESSION):
            return 404, error_body(404, "general_route_not_found", "The requested route was not found.")
        if project != self.project:
            return 404, error_body(404, "project_not_found", "Project with the requested ID could not be found.")
        with self.lock:
            session = self.sessions.get(secret or "")
            live = session is not None and session.live(dt.datetime.now(dt.timezone.utc))
            if live and method == "DELETE":
                session.revoked = True
        if not live:
            return GUEST[0], error_body(*GUEST)
        if method == "DELETE":
            return 204, None
        return 200, session.user_model() if path == ACCOUNT else session.session_model()


def readme_session(stand_in: AppwriteStandIn) -> Session:
    """The session README.md's grpcurl commands use: my-session-token is user-42's."""
    return stand_in.add_session("my-session-token", "user-42", email="ada@example.com", name="Ada",
                                created_at="2024-01-15T10:30:00Z", expire="2030-01-01T00:00:00Z")


def main() -> None:
    parser = argparse.ArgumentParser(description="Appwrite stand-in (the README's session: my-session-token)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--project", default=PROJECT)
    args = parser.parse_args()
    stand_in = AppwriteStandIn(project=args.project).start(args.port)
    readme_session(stand_in)
    print(f"session-cache --idp appwrite --appwrite-endpoint {stand_in.endpoint} "
          f"--appwrite-project {stand_in.project}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stand_in.stop()


if __name__ == "__main__":
    main()
