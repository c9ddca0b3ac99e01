"""The ``pypop`` command as a user runs it: a subprocess, its output and exit status."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pypop.auth.schemes import parse_stored, verify_scheme

SECRET = "a long secret"
# A Dovecot SHA256-CRYPT hash of "secret" (doveadm pw -s SHA256-CRYPT -p secret).
DOVECOT_SHA256 = "{SHA256-CRYPT}$5$rkQlbuAt3Da5dLHt$2uj2d000pphPD4892g6cKXSvOHA3FBB/6Qlj9voHiBD"


def pypop(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pypop", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "PLAIN", "SCRAM-SHA-256"])
def test_passwd_as_in_the_readme(scheme: str) -> None:
    # README: pypop passwd -s SHA512-CRYPT -p 'a long secret'
    run = pypop("passwd", "-s", scheme, "-p", SECRET)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    line = run.stdout
    assert line.endswith("\n")
    assert line.count("\n") == 1
    parsed, value = parse_stored(line.strip())
    assert parsed == scheme
    assert verify_scheme(parsed, value, SECRET)
    assert not verify_scheme(parsed, value, "a long secreT")


def test_passwd_long_options_in_any_order() -> None:
    run = pypop("passwd", "--password", SECRET, "--scheme", "SHA256-CRYPT")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("{SHA256-CRYPT}$5$")


def test_passwd_list() -> None:
    run = pypop("passwd", "-l")
    assert run.returncode == 0
    names = run.stdout.split()
    for name in ("SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN"):
        assert name in names


def test_passwd_test_mode() -> None:
    ok = pypop("passwd", "-t", DOVECOT_SHA256, "-p", "secret")
    assert (ok.returncode, ok.stdout) == (0, "{SHA256-CRYPT} (verified)\n")
    bad = pypop("passwd", "-t", DOVECOT_SHA256, "-p", "wrong")
    assert (bad.returncode, bad.stdout) == (1, "{SHA256-CRYPT} (NOT verified)\n")


def test_passwd_errors() -> None:
    unknown = pypop("passwd", "-s", "ROT13", "-p", "x")
    assert unknown.returncode == 2
    assert unknown.stderr == "pypop passwd: unknown scheme 'ROT13' (-l lists them)\n"
    colon = pypop("passwd", "-s", "PLAIN", "-p", "a:b")
    assert colon.returncode == 1
    assert "cannot be stored in a passwd-file" in colon.stderr
    bogus = pypop("passwd", "--bogus")
    assert bogus.returncode == 2
    assert "unrecognized arguments: --bogus" in bogus.stderr


def test_passwd_prompts_twice_without_p(monkeypatch: pytest.MonkeyPatch) -> None:
    # getpass reads the terminal; in-process, the prompts are answered by a stub.
    from pypop.cli import main

    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["passwd", "-s", "PLAIN"]) == 1
    answers = iter(["same", "same"])
    assert main(["passwd", "-s", "PLAIN"]) == 0


def test_help_lists_the_commands() -> None:
    run = pypop("--help")
    assert run.returncode == 0
    assert "serve" in run.stdout
    assert "passwd" in run.stdout
    missing = pypop()
    assert missing.returncode == 2
