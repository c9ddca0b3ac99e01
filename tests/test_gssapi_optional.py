"""python-gssapi is an optional extra: without it pypop imports, serves and offers no
GSSAPI, and a keytab in the configuration stops start-up with what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_plain_install_needs_no_gssapi() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["gssapi"] = None  # as if not installed: "import gssapi" fails
        from pathlib import Path
        import pypop.server, pypop.auth.sasl
        from pypop.auth import MemoryCredentialStore
        from pypop.auth.kerberos import available
        from pypop.backends.memory import MemoryBackend
        from pypop.config import ConfigError, ServerConfig
        from pypop.server import Server
        assert not available()
        cfg = ServerConfig(listen=[("127.0.0.1", 0)], hostname="localhost")
        Server(cfg, backend=MemoryBackend(), store=MemoryCredentialStore({}))
        cfg.gssapi_keytab = Path("/etc/pop.keytab")
        try:
            Server(cfg, backend=MemoryBackend(), store=MemoryCredentialStore({}))
        except ConfigError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout == (
        "auth.gssapi_keytab needs python-gssapi: pip install 'pypop3[gssapi]' "
        "(and MIT Kerberos, e.g. Debian's libkrb5-dev to build it)\n"
    )
