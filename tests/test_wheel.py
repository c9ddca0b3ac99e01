"""The published wheel, as a user gets it: installed into a fresh venv (not this one),
``pypop serve --demo`` from that venv serves message 1 to curl and to poplib, and stops
on SIGTERM with exit status 0.

The wheels come from ``$PYPOP_WHEEL_DIR`` when set (scripts/test sets it to dist/ right
after scripts/build-wheels made them); otherwise they are built once per session here,
the same way (zig, manylinux2014), which needs a Rust toolchain."""

from __future__ import annotations

import json
import os
import platform
import poplib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pypop.backends.memory import sample_message

from .test_readme_links import relative_links

REPO = Path(__file__).resolve().parent.parent
HASH_LIBRARIES = {"bcrypt", "argon2-cffi", "libpass"}

pytestmark = pytest.mark.skipif(
    not os.environ.get("PYPOP_WHEEL_DIR") and shutil.which("cargo") is None,
    reason="no Rust toolchain (cargo) to build the wheel, and no PYPOP_WHEEL_DIR with one",
)


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _build(out: Path) -> None:
    env_python = sys.executable
    zig = subprocess.run([env_python, "-c", "import ziglang"], capture_output=True).returncode == 0
    cmd: list[str | Path] = [env_python, "-m", "maturin", "build", "--release", "--out", out]
    if zig:  # what scripts/build-wheels publishes
        cmd += ["--zig", "--compatibility", "manylinux2014"]
    env = {
        **os.environ,
        # scripts/build-wheels' target directory: the editable build in target/ stays as is.
        "CARGO_TARGET_DIR": str(REPO / "target" / "dist"),
        # maturin runs `python3 -m ziglang` from PATH: this venv's, which has ziglang.
        "PATH": f"{Path(env_python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _run(*cmd, env=env)
    _run(env_python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO / "backends/maildir")


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pypop3 wheel for this machine, pypop3-maildir wheel)."""
    given = os.environ.get("PYPOP_WHEEL_DIR")
    where = Path(given) if given else tmp_path_factory.mktemp("wheels")
    if not given:
        _build(where)
    arch = platform.machine()
    core = sorted(where.glob(f"pypop3-*-cp311-abi3-*{arch}.whl"))
    maildir = sorted(where.glob("pypop3_maildir-*-py3-none-any.whl"))
    assert len(core) == 1, f"expected one pypop3 wheel for {arch} in {where}: {core}"
    assert len(maildir) == 1, f"expected one pypop3-maildir wheel in {where}: {maildir}"
    return core[0], maildir[0]


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory, wheels: tuple[Path, Path]) -> Path:
    """A fresh venv (no system site-packages): pypop3[testing] and pypop3-maildir from
    the wheels, with their dependencies, as a backend author would install them."""
    root = tmp_path_factory.mktemp("fresh") / "venv"
    core, maildir = wheels
    # No pip of its own (ensurepip costs seconds): this venv's pip installs into it.
    _run(sys.executable, "-m", "venv", "--without-pip", root)
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        root / "bin/python",
        "install",
        "-q",
        "--disable-pip-version-check",
        f"pypop3[testing] @ {core.as_uri()}",
        maildir,
    )
    return root


def _env() -> dict[str, str]:
    # Nothing of this checkout or its venv may leak in; the wheel's compiled codec, not
    # the twin, is what is under test.
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYPOP_PUREPYTHON", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_the_venv_holds_the_wheel_not_this_checkout(venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.metadata as m, json, pypop, pypop.wire as w, pypop_maildir\n"
        "print(w.IMPLEMENTATION)\n"
        "print(pypop.__file__)\n"
        "print(pypop_maildir.__file__)\n"
        "print(json.dumps(sorted(e.name for e in m.entry_points(group='pypop.backends'))))\n"
        "print(json.dumps(sorted(d.metadata['Name'] for d in m.distributions())))\n"
    )
    out = subprocess.run(
        [venv / "bin/python", "-c", code],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    impl, core_file, maildir_file, backends, dists = out
    assert impl == "rust"
    site = str(venv / "lib")
    assert core_file.startswith(site), core_file
    assert maildir_file.startswith(site), maildir_file
    assert json.loads(backends) == ["maildir", "memory"]
    installed = set(json.loads(dists))
    assert {"pypop3", "pypop3-maildir", "trio", "pytest", "pytest-trio"} <= installed
    assert not installed & HASH_LIBRARIES  # the server runs without the hashes extra


def test_the_wheel_metadata_readme_has_only_absolute_links(venv: Path) -> None:
    code = "import importlib.metadata as m; print(m.metadata('pypop3')['Description'])"
    readme = _run(venv / "bin/python", "-c", code)
    assert "pip install pypop3" in readme
    assert relative_links(readme) == []


CONFORMANCE = """
import pytest

from pypop.backends.memory import MemoryBackend
from pypop.testing import BackendConformance


class Harness:
    def make_backend(self):
        return MemoryBackend()

    async def deliver(self, backend, user, message):
        backend.deliver(user, message)


class TestMine(BackendConformance):
    @pytest.fixture
    def harness(self):
        return Harness()
"""


def test_the_testing_extra_runs_the_conformance_kit(venv: Path, tmp_path: Path) -> None:
    """What a backend author does: pip install 'pypop3[testing]', subclass the kit, run
    pytest with pytest-trio's trio_mode."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "test_mine.py").write_text(CONFORMANCE)
    done = subprocess.run(
        [venv / "bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The kit's tests for self-authenticating backends skip for this one.
    assert re.search(r"^\d+ passed, 3 skipped in ", done.stdout.splitlines()[-1]), done.stdout


def test_passwd_without_the_hashes_extra(venv: Path, tmp_path: Path) -> None:
    def passwd(scheme: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [venv / "bin/pypop", "passwd", "-s", scheme, "-p", "a long secret"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    for scheme in ("SCRAM-SHA-256", "SSHA512"):
        ok = passwd(scheme)
        assert (ok.returncode, ok.stderr) == (0, "")
        assert ok.stdout.startswith("{" + scheme + "}")
    for scheme, library in (("SHA512-CRYPT", "libpass"), ("BLF-CRYPT", "bcrypt")):
        refused = passwd(scheme)
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == (
            f"pypop passwd: {{{scheme}}} passwords need the {library} library, which is not "
            "installed: pip install 'pypop3[hashes]'\n"
        )


@pytest.fixture
def demo(venv: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``pypop serve --demo`` from the fresh venv's own console script, on a free port."""
    proc = subprocess.Popen(
        [venv / "bin/pypop", "serve", "--demo", "--listen", "127.0.0.1:0"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the demo printed no curl command within 30 s")
            if m := re.search(rb"curl pop3://user1:password@127\.0\.0\.1:(\d+)/1", line):
                port = int(m.group(1))
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        stdout.close()


@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="no curl")
def test_demo_from_the_wheel_serves_curl_and_poplib_and_stops_on_sigterm(
    demo: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = demo
    expected = sample_message("user1", 1)

    fetched = subprocess.run(
        ["curl", "-sS", "--max-time", "20", f"pop3://user1:password@127.0.0.1:{port}/1"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert fetched.stdout == expected

    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        pop.user("user2")
        pop.pass_("password")
        count, _size = pop.stat()
        assert count == 5
        _resp, lines, octets = pop.retr(1)
        assert b"".join(line + b"\r\n" for line in lines) == sample_message("user2", 1)
        assert octets == len(sample_message("user2", 1))
    finally:
        pop.quit()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
