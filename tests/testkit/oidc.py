"""An OpenID provider as the service meets it for back-channel logout (OpenID Connect
Back-Channel Logout 1.0): an RSA signing key, its JSON Web Key Set served on a free
loopback port where Keycloak publishes it, and the logout tokens it signs. PyJWT and
cryptography are imported when a key set is made, so that importing testkit needs
neither."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


class KeySet:
    """A signing key (`kid`) and its JWKS endpoint, for the realm `realm`; tokens for
    `audience`."""

    def __init__(self, realm: str = "main", kid: str = "kc-1", audience: str = "session-cache") -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.jwt, self.kid, self.audience = jwt, kid, audience
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        public.update({"kid": kid, "use": "sig", "alg": "RS256"})
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
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/realms/{realm}"
        self.jwks_url = f"{self.issuer}/protocol/openid-connect/certs"

    def logout_token(self, sub: str, issued: int | None = None) -> str:
        """A logout token as Keycloak sends one: sub and sid, the logout event, a jti;
        issued at `issued` (now when None), valid for two minutes after."""
        now = int(time.time()) if issued is None else issued
        claims = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + 120,
                  "jti": str(uuid.uuid4()), "sub": sub, "sid": str(uuid.uuid4()),
                  "events": {BACKCHANNEL_EVENT: {}}}
        return self.jwt.encode(claims, self.key, algorithm="RS256",
                               headers={"kid": self.kid, "typ": "logout+jwt"})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
