"""Where the log goes (``[log] target``) and in which shape (``[log] format``).

- ``stderr`` (default; under systemd the journal takes it);
- ``syslog`` (``/dev/log``) or ``syslog:/path/to/socket``: facility mail, tagged
  ``pypop[pid]``;
- a file path: appended to, and reopened when logrotate moves it away
  (``WatchedFileHandler``: no ``copytruncate`` needed). Every worker appends its own
  lines to the same file (``O_APPEND``: whole lines, never interleaved mid-line).

``text`` is ``<date> <LEVEL> <logger>: <message>`` (with ``[pid]`` after the logger
when several workers write); docs/fail2ban.conf matches its failed-login lines.
``json`` is one object a line: ``time``, ``level``, ``logger``, ``pid``, ``message``
(and ``exception`` for a traceback).

No secrets reach any of them: pypop never logs a password, a SASL response, a token
or a hash; peer-controlled text (user names) is cleaned (pypop.server.logins.clean).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

from pypop.config import ConfigError

__all__ = ["JsonFormatter", "TextFormatter", "configure"]


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with its date formatted once a second, not per record
    (``strftime`` and ``localtime`` were a sixth of a login's logging cost)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's "%s,%03d"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(target: str, fmt: str, level: str, *, with_pid: bool = False) -> None:
    """Replace the root logger's handlers with the configured one."""
    handler: logging.Handler
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif target == "syslog" or target.startswith("syslog:"):
        where = target.partition(":")[2] or "/dev/log"
        try:
            handler = logging.handlers.SysLogHandler(
                address=where, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as exc:
            raise ConfigError(f"log.target {target}: {exc.strerror or exc}") from None
    else:
        try:
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"log.target {target}: {exc.strerror or exc}") from None
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif target.startswith("syslog"):
        # syslog adds the date; the tag carries the pid.
        tagged = "pypop[%(process)d]: %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(tagged))
    else:
        pid = "[%(process)d]" if with_pid else ""
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s %(name)s{pid}: %(message)s"))
    # No record needs its caller's file and line, its thread or its multiprocessing
    # name (the logging HOWTO's "Optimization"): each costs a lookup per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
