"""Turning the client's arguments (or a POP URL, or ~/.netrc) into one Options."""

from __future__ import annotations

from pathlib import Path

from pypop.client._core import Options, TLSMode, is_loopback
from pypop.client.url import netrc_credentials, parse_url

__all__ = ["resolve"]

_TLS_MODES = ("implicit", "require", "auto", "off")


def resolve(
    host: str,
    port: int | None,
    user: str | None,
    password: str | None,
    token: str | None,
    auth: str,
    tls: str | None,
    netrc: bool | str | Path,
    pipelining: bool,
    window: int,
) -> Options:
    """``host`` may be a pop:// or pops:// URL; explicit arguments win over the URL."""
    url_auth = None
    url_tls = None
    if "://" in host:
        url = parse_url(host)
        host = url.host
        port = port if port is not None else url.port
        user = user if user is not None else url.user
        password = password if password is not None else url.password
        url_auth, url_tls = url.auth, url.tls
    if tls is None:
        tls = url_tls
    if tls is None:
        tls = "implicit" if port == 995 else "auto" if is_loopback(host) else "require"
    if tls not in _TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(_TLS_MODES)}, not {tls!r}")
    if port is None:
        port = 995 if tls == "implicit" else 110
    if auth == "auto" and url_auth is not None:
        auth = url_auth
    auth = "auto" if auth in ("*", "auto") else auth.upper()
    if password is None and token is None and netrc is not False:
        path = None if netrc is True else Path(netrc)
        found = netrc_credentials(host, user, path)
        if found is not None:
            user, password = found[0] or user, found[1]
    mode: TLSMode = tls  # type: ignore[assignment]
    return Options(
        host=host,
        port=port,
        user=user,
        password=password,
        token=token,
        auth=auth,
        tls=mode,
        pipelining=pipelining,
        window=window,
    )
