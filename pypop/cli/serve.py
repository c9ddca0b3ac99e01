"""``pypop serve``: run the server from a TOML file and/or flags (docs/config.md)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from pypop import __version__
from pypop.config import ConfigError, ServerConfig, load_config, parse_address
from pypop.errors import BackendError
from pypop.registry import BackendLoadError

if TYPE_CHECKING:
    from pypop.server import Server

__all__ = ["add_parser", "run"]

log = logging.getLogger("pypop")

DEMO_PORT = 1110
DEMO_USERS = ("user1", "user2", "user3")
DEMO_PASSWORD = "password"  # noqa: S105 (documented demo credential)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the POP3 server")
    p.add_argument("-c", "--config", type=Path, help="TOML config file (docs/config.md)")
    p.add_argument(
        "--demo", action="store_true", help=f"sample users and mail on 127.0.0.1:{DEMO_PORT}"
    )
    p.add_argument(
        "--listen", action="append", metavar="HOST:PORT", help="plain POP3 listener (repeatable)"
    )
    p.add_argument(
        "--listen-tls",
        action="append",
        metavar="HOST:PORT",
        help="implicit-TLS listener, RFC 8314 (repeatable)",
    )
    p.add_argument("--backend", help="backend name from the pypop.backends entry points")
    p.add_argument(
        "-o",
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option (repeatable)",
    )
    p.add_argument("--passwd-file", type=Path, help="Dovecot-style passwd-file")
    p.add_argument(
        "--credentials",
        metavar="NAME",
        help="credential store from the pypop.credentials entry points (instead of a passwd-file)",
    )
    p.add_argument(
        "-C",
        "--credentials-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="credential store option (repeatable)",
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--hostname", help="host name used in APOP/CRAM-MD5 challenges")
    p.add_argument("--apop", action="store_true", default=None, help="offer APOP")
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        default=None,
        help="allow USER/PASS, PLAIN and LOGIN without TLS",
    )
    p.add_argument("--idle-timeout", type=float, help="seconds (>= 600, RFC 1939 §3)")
    p.add_argument("--max-connections", type=int)
    p.add_argument("--max-connections-per-ip", type=int)
    p.add_argument("--shutdown-timeout", type=float)
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (server.workers; default: one per core)",
    )
    p.add_argument(
        "--proxy-from",
        action="append",
        metavar="NETWORK",
        help="accept PROXY protocol headers from this network only, and require one "
        "(server.proxy_from; repeatable)",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus /metrics, /healthz")
    p.add_argument("--log-target", metavar="stderr|syslog|PATH", help="where the log goes")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def _apply_flags(args: argparse.Namespace, cfg: ServerConfig) -> None:
    if args.listen:
        cfg.set_listen([parse_address(a) for a in args.listen])
    if args.listen_tls:
        cfg.set_listen_tls([parse_address(a, 995) for a in args.listen_tls])
    if args.backend:
        cfg.backend = args.backend
        if args.backend != "memory" and not args.config:
            cfg.backend_options = {}
    for item in args.backend_option:
        key, value = _key_value("--backend-option", item)
        cfg.backend_options[key] = value
    if args.credentials:
        if args.credentials != cfg.credentials:
            cfg.credentials_options = {}
        cfg.credentials = args.credentials
    for item in args.credentials_option:
        if cfg.credentials is None:
            raise ConfigError("--credentials-option needs --credentials NAME")
        key, value = _key_value("--credentials-option", item)
        cfg.credentials_options[key] = value
    simple = {
        "passwd_file": args.passwd_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "hostname": args.hostname,
        "apop": args.apop,
        "allow_plaintext": args.allow_plaintext,
        "idle_timeout": args.idle_timeout,
        "max_connections": args.max_connections,
        "max_connections_per_ip": args.max_connections_per_ip,
        "shutdown_timeout": args.shutdown_timeout,
        "workers": args.workers,
        "proxy_from": args.proxy_from,
        "metrics_listen": args.metrics_listen,
        "log_target": args.log_target,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    for name, value in simple.items():
        if value is not None:
            setattr(cfg, name, value)


def _key_value(flag: str, item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} wants KEY=VALUE, got {item!r}")
    return key, value


def _demo_config(cfg: ServerConfig, workdir: Path) -> None:
    passwd = workdir / "passwd"
    passwd.write_text(
        "".join(f"{u}:{{PLAIN}}{DEMO_PASSWORD}\n" for u in DEMO_USERS), encoding="utf-8"
    )
    cfg.set_listen([("127.0.0.1", DEMO_PORT)])
    cfg.passwd_file = passwd
    cfg.backend = "memory"
    cfg.backend_options = {"sample_users": len(DEMO_USERS), "sample_messages": 5}
    cfg.apop = True


async def _run(cfg: ServerConfig, demo: bool) -> int:
    """Serve until a signal; 0 after a graceful stop, 1 after a forced one."""
    from pypop.registry import create_backend
    from pypop.server import Server

    count = cfg.worker_count()
    backend = None
    if count > 1:
        # Made here once to check it (bad options stop start-up before any worker
        # runs), and to ask whether it can be shared between processes.
        backend = create_backend(cfg.backend, cfg.backend_options)
        if getattr(backend, "process_local", False):
            if cfg.workers > 1:
                await backend.aclose()
                raise ConfigError(
                    f"the {cfg.backend} backend keeps its mail in one process: it cannot "
                    f"run with server.workers = {cfg.workers} (use --workers 1, or a "
                    f"backend that stores mail outside the process, such as maildir)"
                )
            count = 1  # one per core, but this backend allows only one
        else:
            await backend.aclose()
            backend = None
    if count > 1:
        from pypop.server.core import _default_store, _server_secret
        from pypop.server.workers import Supervisor

        # Checked (and the server secret created) before any worker starts.
        _default_store(cfg)
        _server_secret(cfg)
        from pypop.server.logsetup import configure

        # Several processes now write the log: each line says which.
        configure(cfg.log_target, cfg.log_format, cfg.log_level, with_pid=True)
        return await Supervisor(cfg, count).run()

    server = Server(cfg, backend=backend)
    metrics_task = None
    if cfg.metrics_listen is not None:
        from pypop.server.metrics import MetricsServer

        def healthy() -> str | None:
            return "shutting down" if server.shutting_down else None

        metrics_task = MetricsServer(cfg.metrics_listen, healthy=healthy)
    forced = trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(watch_signals, server, outer.cancel_scope, forced)
        if metrics_task is not None:
            await outer.start(metrics_task.run)
        async with trio.open_nursery() as inner:
            await inner.start(server.run)
            if demo:
                host, port = server.addresses[0]
                print(
                    f"pypop {__version__} demo: users {', '.join(DEMO_USERS)}, "
                    f"password {DEMO_PASSWORD!r}",
                    flush=True,
                )
                print(f"  curl pop3://{DEMO_USERS[0]}:{DEMO_PASSWORD}@{host}:{port}/1", flush=True)
        outer.cancel_scope.cancel()
    return 1 if forced.is_set() else 0


async def watch_signals(
    server: Server,
    scope: trio.CancelScope,
    forced: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGTERM/SIGINT: graceful shutdown; a second one: stop now. SIGHUP: read
    the TLS certificate and key again (a broken pair keeps the old one), and the
    passwd-file if it changed. Started (``nursery.start``) once the handlers are in."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the TLS certificate and the passwd-file")
                await server.reload()
                continue
            if server.shutting_down:
                log.warning("second %s: stopping now, open sessions are cut", name)
                forced.set()
                scope.cancel()
                return
            log.info("%s: graceful shutdown", name)
            server.shutdown()


def run(args: argparse.Namespace) -> int:
    from pypop.server.logsetup import configure
    from pypop.server.malloc import tune as tune_malloc

    logging.basicConfig(
        level=args.log_level or "INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config) if args.config else ServerConfig()
        with tempfile.TemporaryDirectory(prefix="pypop-demo-") as tmp:
            if args.demo:
                _demo_config(cfg, Path(tmp))
            _apply_flags(args, cfg)
            cfg.validate()
            configure(cfg.log_target, cfg.log_format, cfg.log_level)
            tune_malloc()
            status = trio.run(_run, cfg, args.demo)
    except BaseException as exc:
        # Errors from inside trio's nurseries arrive wrapped in exception groups;
        # the admin gets one line, never a traceback, for the expected ones.
        leaf = _first_leaf(exc)
        if isinstance(leaf, ConfigError | BackendLoadError | ValueError):
            print(f"pypop: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, OSError):
            print(f"pypop: cannot start: {_os_error(leaf)}", file=sys.stderr)
            return 1
        if isinstance(leaf, BackendError):  # e.g. the database is down
            print(f"pypop: cannot start: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
    return status


def _os_error(exc: OSError) -> str:
    """The message without "[Errno N]", with the file name when there is one."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
