"""Server memory per idle TLS connection: ``python benches/tls_idle.py [--connections N]``.

Starts ``pypop serve --demo`` from the current directory with an implicit-TLS
listener (a trustme certificate), opens and closes 200 TLS connections (the
warm-up), then holds ``--connections`` (default 2,000) that have done the handshake
and read the greeting, and prints the growth of the server's RSS per connection. Run
it from two checkouts to compare them; RSS counts OpenSSL's memory too, which
``benches/idle_memory.py`` (tracemalloc) cannot see.
"""

from __future__ import annotations

import argparse
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from benches.servers import free_port


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
    )
    greeting = b""
    while b"\r\n" not in greeting:
        chunk = tls.recv(256)
        if not chunk:
            raise RuntimeError("closed before the greeting")
        greeting += chunk
    return tls


def _wait(port: int, ctx: ssl.SSLContext, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        try:
            _connect(port, ctx).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no TLS greeting on port {port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * n + 1000)), hard))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with tempfile.TemporaryDirectory(prefix="pypop-tls-idle-") as tmp:
        chain, key = Path(tmp, "chain.pem"), Path(tmp, "key.pem")
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        port = free_port()
        limit = str(n + 500)
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "pypop", "serve", "--demo", "--workers", "1"),
                *("--listen", "127.0.0.1:0", "--listen-tls", f"127.0.0.1:{port}"),
                *("--tls-cert", str(chain), "--tls-key", str(key)),
                *("--max-connections", limit, "--max-connections-per-ip", limit),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(port, ctx, server)
            for tls in [_connect(port, ctx) for _ in range(200)]:
                tls.close()
            time.sleep(1)
            before = _rss_kib(server.pid)
            held = [_connect(port, ctx) for _ in range(n)]
            time.sleep(1)
            after = _rss_kib(server.pid)
            for tls in held:
                tls.close()
        finally:
            server.terminate()
            server.wait()
    print(f"server RSS per idle TLS connection: {(after - before) / n:.2f} KiB ({n} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
