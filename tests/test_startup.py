"""``pypop serve`` start-up and stop, as an admin sees them: exit status and one line.

docs/config.md promises exit status 2 for configuration errors and 1 for a server that
cannot start (a port in use); each message names what is wrong.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trustme

PASSWD = "alice:{PLAIN}secret\n"


def serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pypop", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def passwd(tmp_path: Path, text: str = PASSWD) -> str:
    path = tmp_path / "passwd"
    path.write_text(text)
    return str(path)


def test_port_in_use_names_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve("--listen", f"127.0.0.1:{port}", "--passwd-file", passwd(tmp_path))
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (
        f"pypop: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_missing_passwd_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    run = serve("--listen", "127.0.0.1:0", "--passwd-file", str(missing))
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == (
        "pypop: the pypop credential store 'passwd-file' cannot start: [Errno 2] "
        f"cannot read passwd-file {missing}: No such file or directory"
    )


def _certs(tmp_path: Path) -> tuple[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    chain, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    return str(chain), str(key)


def test_swapped_certificate_and_key(tmp_path: Path) -> None:
    chain, key = _certs(tmp_path)
    run = serve(
        "--listen", "127.0.0.1:0", "--passwd-file", passwd(tmp_path),
        "--tls-cert", key, "--tls-key", chain,
    )  # fmt: skip
    assert run.returncode == 2
    last = run.stderr.splitlines()[-1]
    assert last.startswith(f"pypop: cannot use tls.cert {key} with tls.key {chain}: ")
    assert "swapped" in last
    assert "PEM lib" not in last.split("(")[0]


def test_missing_certificate_names_the_file(tmp_path: Path) -> None:
    _, key = _certs(tmp_path)
    missing = tmp_path / "missing.pem"
    run = serve(
        "--listen", "127.0.0.1:0", "--passwd-file", passwd(tmp_path),
        "--tls-cert", str(missing), "--tls-key", key,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == f"pypop: tls.cert {missing}: No such file or directory"


def test_config_file_errors_name_file_setting_and_type(tmp_path: Path) -> None:
    cfg = tmp_path / "pypop.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:110"\n')
    run = serve("-c", str(cfg))
    assert run.returncode == 2
    assert run.stderr == f"pypop: {cfg}: server.listen must be a list, got str '127.0.0.1:110'\n"
    cfg.write_text("[auth]\npaswd_file = 'x'\n")
    run = serve("-c", str(cfg))
    assert run.returncode == 2
    assert run.stderr == (
        f"pypop: {cfg}: unknown setting auth.paswd_file (did you mean auth.passwd_file?)\n"
    )


def test_nan_is_refused_for_every_number_setting(tmp_path: Path) -> None:
    # TOML has nan, and every check is a comparison, which nan passes: with
    # auth_failure_delay = nan each failed login crashed its session (trio refuses a
    # NaN deadline) and the client got EOF instead of -ERR [AUTH].
    cfg = tmp_path / "pypop.toml"
    for key in ("auth_failure_delay", "auth_penalty_initial", "auth_penalty_max",
                "shutdown_timeout", "idle_timeout", "line_timeout", "lock_wait"):  # fmt: skip
        cfg.write_text(f"[limits]\n{key} = nan\n")
        run = serve("-c", str(cfg), "--listen", "127.0.0.1:0", "--passwd-file", passwd(tmp_path))
        assert (run.returncode, run.stderr) == (
            2,
            f"pypop: {cfg}: limits.{key} must be a number, got nan\n",
        )
    run = serve(
        "--shutdown-timeout", "nan", "--listen", "127.0.0.1:0", "--passwd-file", passwd(tmp_path)
    )  # fmt: skip
    assert (run.returncode, run.stderr) == (
        2,
        "pypop: limits.shutdown_timeout must be a number, got nan\n",
    )


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, str]:
    """The server, its port, and what it logged up to "listening on"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pypop", "serve", "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    log = ""
    while line := proc.stderr.readline():
        log += line
        if "listening on 127.0.0.1:" in line:
            return proc, int(line.rsplit("127.0.0.1:", 1)[1].split()[0]), log
    proc.kill()
    raise AssertionError(f"server exited before listening: {log}")


def test_passwd_file_without_valid_users_warns_loudly(tmp_path: Path) -> None:
    path = passwd(tmp_path, "# nobody yet\nbob\n")
    proc, _, log = _start(tmp_path, "--passwd-file", path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (
        f"WARNING pypop.auth: passwd-file {path} has NO valid users (1 malformed line): "
        "every login will fail"
    ) in log


def test_second_signal_stops_at_once_with_status_1(tmp_path: Path) -> None:
    proc, port, _ = _start(tmp_path, "--passwd-file", passwd(tmp_path), "--shutdown-timeout", "60")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert client.recv(512).startswith(b"+OK")
        proc.send_signal(signal.SIGTERM)
        # The graceful stop waits for the open session...
        assert proc.stderr is not None
        while "graceful shutdown" not in proc.stderr.readline():
            pass
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)  # ...until a second signal
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "second SIGTERM: stopping now, open sessions are cut" in err
    assert "end=shutdown" in err
    assert "end=?" not in err


def test_graceful_stop_exits_0(tmp_path: Path) -> None:
    proc, _, _ = _start(tmp_path, "--passwd-file", passwd(tmp_path))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "stopped after 0 sessions" in err
    assert os.linesep.join(err.splitlines()).count("Traceback") == 0
