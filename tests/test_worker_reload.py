"""SIGHUP reaches a worker that was starting when it came. The supervisor passes
signals only to ready workers (one still starting may have no handler yet): a worker
that had read the TLS certificate before the SIGHUP, and became ready after it, kept
the old certificate until the next SIGHUP (after a renewal: until it expired).
In-process supervisor, one real worker slowed in start-up by a credential store
plugin (registered through an entry point, after the TLS files are read)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trio
import trustme

from pypop.config import ServerConfig
from pypop.server.workers import Supervisor

from .test_worker_hang import until
from .test_workers import maildir

pytest.importorskip("pypop_maildir")

PLUGIN = """
import os
import time
from pathlib import Path

from pypop.auth.passwd import create as _create


def create(options):
    Path(os.environ["SLOWSTORE_MARK"]).touch()
    time.sleep(3)
    return _create(options)
"""


def served_certificate(port: int, ca: trustme.CA) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10),
        server_hostname="pop.test",
    ) as s:
        cert = s.getpeercert(binary_form=True)
        assert cert is not None
        return cert


async def test_a_sighup_during_a_worker_start_up_is_passed_on_when_it_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = tmp_path / "plugin"
    (plugin / "slowstore-0.dist-info").mkdir(parents=True)
    (plugin / "slowstore.py").write_text(PLUGIN)
    (plugin / "slowstore-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: slowstore\nVersion: 0\n"
    )
    (plugin / "slowstore-0.dist-info" / "entry_points.txt").write_text(
        "[pypop.credentials]\nslowstore = slowstore:create\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    mark = tmp_path / "in-start-up"
    monkeypatch.setenv("SLOWSTORE_MARK", str(mark))
    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    old = ca.issue_cert("pop.test")
    old.private_key_and_cert_chain_pem.write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    maildir(tmp_path / "mail", "alice", 1)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        listen_tls=[("127.0.0.1", 0)],
        tls_cert=cert,
        tls_key=key,
        hostname="pop.test",
        backend="maildir",
        backend_options={"root": str(tmp_path / "mail")},
        credentials="slowstore",
        credentials_options={"path": str(tmp_path / "passwd")},
        shutdown_timeout=1.0,
        log_target=str(tmp_path / "workers.log"),
    )
    sup = Supervisor(config, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # The worker has read the certificate and waits in its store's start-up.
        await until(mark.exists, 30)
        assert not sup.slots[0].ready
        new = ca.issue_cert("pop.test")
        new.private_key_and_cert_chain_pem.write_to_path(str(cert))
        new.private_key_pem.write_to_path(str(key))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: sup.slots[0].ready, 30)
        port = sup.tls_addresses[0][1]
        expected = ssl.PEM_cert_to_DER_cert(new.cert_chain_pems[0].bytes().decode())
        deadline = time.monotonic() + 10
        while (got := await trio.to_thread.run_sync(served_certificate, port, ca)) != expected:
            assert time.monotonic() < deadline, "the worker still serves the old certificate"
            await trio.sleep(0.2)
        assert got == expected
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: sup.alive == 0, 30)
        nursery.cancel_scope.cancel()
