"""POP URLs (RFC 2384) and ``~/.netrc`` credentials.

``pop://user;AUTH=mech@host:port`` and ``pops://`` (implicit TLS, port 995). Every part
is percent-decoded. ``;AUTH=*`` lets the client choose (as does no ``;AUTH``: the
client's ``auth="auto"``); ``;AUTH=+APOP`` is APOP; any other name is a SASL
mechanism. RFC 2384 has no passwords in URLs; ``user:password@`` is accepted as curl
does, but ``~/.netrc`` (or the ``password`` argument) is the place for one.
"""

from __future__ import annotations

import netrc
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PopURL", "netrc_credentials", "parse_url"]


@dataclass(frozen=True, slots=True)
class PopURL:
    host: str
    port: int
    tls: str | None
    """``"implicit"`` for pops://, None for pop:// (the client's default policy)."""
    user: str | None = None
    auth: str | None = None
    """``"auto"`` for ``*``, ``"+APOP"``, a SASL name, or None when absent."""
    password: str | None = None


def parse_url(url: str) -> PopURL:
    """Parse a pop:// or pops:// URL; ``ValueError`` says what is wrong."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("pop", "pop3", "pops", "pop3s"):
        raise ValueError(f"not a POP URL (pop:// or pops://): {url!r}")
    implicit = scheme in ("pops", "pop3s")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("a POP URL has no path, query or fragment")
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        userinfo, hostport = "", netloc
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 address in URL")
        host, rest = hostport[1:end], hostport[end + 1 :]
    else:
        host, _, port_text = hostport.partition(":")
        rest = ":" + port_text if _ else ""
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"bad port in URL: {rest!r}")
        port = int(rest[1:])
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
    else:
        port = 995 if implicit else 110
    if not host:
        raise ValueError("no host in URL")
    user: str | None = None
    auth: str | None = None
    password: str | None = None
    if userinfo:
        name, semi, params = userinfo.partition(";")
        if semi:
            key, eq, value = params.partition("=")
            if key.upper() != "AUTH" or not eq or not value:
                raise ValueError(f"unknown URL parameter {params!r} (only ;AUTH=)")
            value = urllib.parse.unquote(value, errors="strict")
            auth = "auto" if value == "*" else value.upper()
        name, colon, pw = name.partition(":")
        if colon:
            password = urllib.parse.unquote(pw, errors="strict")
        user = urllib.parse.unquote(name, errors="strict") or None
    return PopURL(
        host=urllib.parse.unquote(host),
        port=port,
        tls="implicit" if implicit else None,
        user=user,
        auth=auth,
        password=password,
    )


def netrc_credentials(
    host: str, user: str | None, path: Path | None = None
) -> tuple[str, str] | None:
    """(login, password) for ``host`` from ``~/.netrc`` (or ``$NETRC``, or ``path``),
    as curl and fetchmail read it; None without a matching entry or file. When ``user``
    is given the entry's login must match it."""
    if path is None:
        env = os.environ.get("NETRC")
        path = Path(env) if env else Path.home() / ".netrc"
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return None
    if entry is None:
        return None
    login, _, password = entry
    if user is not None and login and login != user:
        return None
    if not password:
        return None
    return (login or user or ""), password
