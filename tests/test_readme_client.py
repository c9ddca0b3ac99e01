"""The README's client examples run as written, against a real ``pypop serve``: only
the host, port and password are swapped in (and the test CA trusted via SSL_CERT_FILE)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .popservers import PASSWORD, Certs, PopServer, corpus, pypop_server

README = Path(__file__).resolve().parent.parent / "README.md"


def client_section() -> str:
    text = README.read_text()
    return text[text.index("## The client") : text.index("## Benchmarks")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PopServer]:
    certs = Certs.make(tmp_path / "certs")
    srv = pypop_server(tmp_path / "srv", certs, {"alice": corpus()})
    yield srv
    srv.stop()


def localise(code: str, srv: PopServer) -> str:
    code = code.replace("pops://alice@pop.example.org", srv.url(tls=True))
    code = code.replace("pop://alice@127.0.0.1:1110", srv.url())
    return code.replace('"secret"', repr(PASSWORD))


def test_python_examples(server: PopServer, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", client_section(), re.S)
    assert len(blocks) == 3
    env = dict(os.environ, SSL_CERT_FILE=str(server.certs.ca_file))
    for block in blocks:
        code = localise(block, server)
        run = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"{block}\n{run.stderr}"
        assert run.stdout.strip()
    assert (tmp_path / "attachments" / "_CON.txt").exists()


def test_shell_examples(server: PopServer, tmp_path: Path) -> None:
    [block] = re.findall(r"```sh\n(.*?)```", client_section(), re.S)
    env = dict(
        os.environ,
        SSL_CERT_FILE=str(server.certs.ca_file),
        PYPOP_PASSWORD=PASSWORD,
        HOME=str(tmp_path),
    )
    for line in block.strip().splitlines():
        command = line.split("#")[0].strip()
        argv = shlex.split(localise(command, server).replace("~/", f"{tmp_path}/"))
        assert argv[:2] == ["pypop", "fetch"]
        run = subprocess.run(
            [sys.executable, "-m", "pypop", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, f"{line}\n{run.stderr}"
    assert len(list((tmp_path / "Mail" / "new").iterdir())) == len(corpus()) - 2
