"""Real nginx and Caddy (Debian's packages) in front of a stand-in upstream that records the
headers it receives, with session-cache's /auth (--http-listen) and the Appwrite stand-in
behind them, each proxy run from its file in deploy/ with only the ports changed. Through
each proxy: a valid token reaches the upstream with the user's headers; no token, an
unknown one, and tokens revoked by InvalidateToken and InvalidateUser get 401 and the
upstream is never called; a client's own x-auth-request-user never reaches it; the
provider down gives the proxy's error answer, never an allow."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from support import BIN, ROOT, WORK, Server, eventually, free_port, grpcurl, log_path, stop_process
from testkit.appwrite import AppwriteStandIn

DEFAULT_PORTS = {"proxy": 8080, "app": 8000, "auth": 8081}


def has_http_listener() -> bool:
    if not BIN.is_file():
        return False
    done = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, timeout=30)
    return "--http-listen" in done.stdout


pytestmark = pytest.mark.skipif(not has_http_listener(), reason="this build serves no --http-listen")


class Upstream:
    """The service behind the proxy: answers 200 and records each request's headers."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                upstream.seen.append({k.lower(): v for k, v in self.headers.items()})
                body = b"upstream"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def templated(path: Path, ports: dict[str, int]) -> str:
    """The deploy file with its three default ports replaced, nothing else."""
    text = path.read_text()
    for name, default in DEFAULT_PORTS.items():
        text = re.sub(rf"(?<![0-9]){default}(?![0-9])", str(ports[name]), text)
    return text


def start_nginx(ports: dict[str, int]) -> subprocess.Popen:
    prefix = WORK / "nginx"
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(templated(ROOT / "deploy" / "nginx" / "nginx.conf", ports))
    return subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf),
         "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;"],
        stdout=log_path("nginx").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def start_caddy(ports: dict[str, int]) -> subprocess.Popen:
    home = WORK / "caddy"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    conf = home / "Caddyfile"
    conf.write_text(templated(ROOT / "deploy" / "caddy" / "Caddyfile", ports))
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    return subprocess.Popen(["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"], env=env,
                            stdout=log_path("caddy").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def get(port: int, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/orders", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def edge(start):
    """The Appwrite stand-in (this module's own, so that it can be stopped), session-cache
    with /auth, the upstream, and nginx and Caddy in front."""
    appwrite = AppwriteStandIn().start()
    auth_port = free_port()
    # A provider call past 500 ms is a provider that cannot answer (the last test).
    server = start(Server("edge-proxies", "memory",
                          ["--http-listen", f"127.0.0.1:{auth_port}", "--idp-timeout-ms", "500",
                           *appwrite.flags()]))
    server.wait_for("SERVING")
    upstream = Upstream()
    proxies = {}
    for name, starter in (("nginx", start_nginx), ("caddy", start_caddy)):
        port = free_port()
        proc = starter({"proxy": port, "app": upstream.port, "auth": auth_port})
        if not eventually(10, lambda port=port: get(port, {}) != 0):
            stop_process(proc)
            pytest.fail(f"{name} did not answer on {port}: {log_path(name).read_text()}")
        proxies[name] = (port, proc)
    yield appwrite, server, upstream, {name: port for name, (port, _) in proxies.items()}
    for _, proc in proxies.values():
        stop_process(proc)
    upstream.stop()
    appwrite.stop()


PROXIES = ["nginx", "caddy"]


def session(appwrite: AppwriteStandIn) -> tuple[str, str]:
    run_id = uuid.uuid4().hex[:10]
    token, user = f"proxied-{run_id}", f"proxied-user-{run_id}"
    appwrite.add_session(token, user)
    return token, user


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_valid_token_reaches_the_upstream_with_the_users_headers(edge, proxy):
    """200 from the upstream, which saw the user's identity headers and not the client's."""
    appwrite, _, upstream, ports = edge
    token, user = session(appwrite)
    before = len(upstream.seen)
    status = get(ports[proxy], {"Authorization": f"Bearer {token}", "X-Auth-Request-User": "admin",
                                "X-Auth-Request-Email": "root@example.com"})
    assert status == 200
    seen = upstream.seen[before:]
    assert len(seen) == 1
    assert seen[0]["x-auth-request-user"] == user
    assert seen[0]["x-auth-request-email"] == f"{user}@example.com"
    assert seen[0]["x-auth-request-email-verified"] == "true"


@pytest.mark.parametrize("proxy", PROXIES)
@pytest.mark.parametrize("case", ["no token", "unknown", "InvalidateToken", "InvalidateUser", "spoof only"])
def test_refused_requests_get_401_and_never_reach_the_upstream(edge, proxy, case):
    """No token, an unknown token, tokens revoked by InvalidateToken or InvalidateUser, and a
    client that only sends x-auth-request-user: admin: 401, the upstream never called."""
    appwrite, server, upstream, ports = edge
    headers: dict[str, str] = {}
    if case == "unknown":
        headers = {"Authorization": "Bearer no-such-session"}
    elif case == "spoof only":
        headers = {"X-Auth-Request-User": "admin"}
    elif case.startswith("Invalidate"):
        token, user = session(appwrite)
        headers = {"Authorization": f"Bearer {token}"}
        assert get(ports[proxy], headers) == 200
        appwrite.revoke(token)
        method, body = (("InvalidateToken", {"token": token}) if case == "InvalidateToken"
                        else ("InvalidateUser", {"userId": user}))
        assert grpcurl(server.address, f"sessioncache.v1.SessionCache/{method}", data=body).returncode == 0
    before = len(upstream.seen)
    assert get(ports[proxy], headers) == 401
    assert len(upstream.seen) == before


def test_zz_the_provider_down_is_the_proxys_error_never_an_allow(edge):
    """The provider not answering within --idp-timeout-ms: a session the cache does not
    know gets nginx's 500 and Caddy's 503 (the cache's answer copied), and the upstream is
    never called."""
    appwrite, _, upstream, ports = edge
    token, _ = session(appwrite)
    appwrite.delay_s = 1.5
    before = len(upstream.seen)
    assert get(ports["nginx"], {"Authorization": f"Bearer {token}"}) == 500
    assert get(ports["caddy"], {"Authorization": f"Bearer {token}"}) == 503
    assert len(upstream.seen) == before
