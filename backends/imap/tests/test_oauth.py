"""Bearer tokens pass through: XOAUTH2 and OAUTHBEARER from the POP3 client become the
same mechanism upstream, checked by Dovecot's oauth2 passdb against a token
introspection endpoint (a small HTTP server in the test, on 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import trio

from pypop_imap import create
from tests.conftest import backend_options, pool_users
from tests.dovecot import Dovecot
from tests.pop3 import Raw, pypop

TOKENS = {"token-of-user1": "user1"}


class _Introspection(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode())
        token = (form.get("token") or [""])[0]
        user = TOKENS.get(token)
        body = json.dumps({"active": True, "username": user} if user else {"active": False})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def introspection() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/introspect"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_bearer_tokens_pass_through(
    mechanism: str,
    introspection: str,
    make_dovecot: Callable[..., Dovecot],
    certs: dict[str, Path],
) -> None:
    d = make_dovecot(users=pool_users(), oauth_url=introspection)
    d.deliver("user1", b"Subject: oauth\r\n\r\nbody\r\n")
    backend = create(backend_options(d, certs))

    def message(token: str) -> str:
        if mechanism == "XOAUTH2":
            raw = f"user=user1\x01auth=Bearer {token}\x01\x01"
        else:
            raw = f"n,a=user1,\x01auth=Bearer {token}\x01\x01"
        return base64.b64encode(raw.encode()).decode()

    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def session() -> list[bytes]:
            c = Raw(port)
            try:
                out = [c.cmd(f"AUTH {mechanism} {message('token-of-user1')}")]
                out.append(c.cmd("STAT"))
                out.append(c.cmd("QUIT"))
                return out
            finally:
                c.close()

        def wrong() -> list[bytes]:
            c = Raw(port)
            try:
                challenge = c.cmd(f"AUTH {mechanism} {message('not-a-token')}")
                # RFC 7628: the error JSON as a challenge, then the client's answer.
                final = c.cmd("AQ==" if mechanism == "OAUTHBEARER" else "")
                return [challenge[:2], final]
            finally:
                c.close()

        good = await trio.to_thread.run_sync(session)
        bad = await trio.to_thread.run_sync(wrong)
    assert good == [
        b"+OK maildrop has 1 messages (24 octets)",
        b"+OK 1 24",
        b"+OK Logging out",
    ]
    assert bad == [b"+ ", b"-ERR [AUTH] Authentication failed"]
    assert f"method={mechanism}" in d.log  # the token went upstream, as a token
    await backend.aclose()
