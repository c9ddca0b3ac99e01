"""Per-user policies: what a user database says about a user besides the password.

Dovecot's passwd-file carries them as extra fields (``key=value`` separated by
spaces, after the seventh ``:``); :func:`parse_extra_fields` reads the ones that
matter to POP3:

- ``nologin`` (or ``nologin=y``): the password may be right, the login is refused
  with ``-ERR [SYS/PERM]`` and ``reason=...`` (Dovecot's field) as the text.
  ``reason`` takes the rest of the line, so it may contain spaces; put it last.
- ``allow_nets=127.0.0.0/8,2001:db8::/32,192.0.2.7``: the only client addresses the
  user may log in from; from elsewhere the login fails as a wrong password does
  (Dovecot's rule). IPv4-mapped IPv6 addresses count as IPv4.
- ``userdb_mail=maildir:~/Maildir`` (Dovecot's mail location) and the home field
  (sixth, or ``userdb_home=``): where the maildrop is; the backend decides what it
  can serve (:class:`pypop.backend.Account`).
- ``login_delay=N`` (seconds) and ``expire=N`` (days) or ``expire=NEVER``: this
  user's RFC 2449 LOGIN-DELAY and EXPIRE (§6.5, §6.7). Before login CAPA then says
  ``LOGIN-DELAY n USER`` / ``EXPIRE n USER``; after it, the user's own value. The
  LOGIN-DELAY is enforced (``-ERR [LOGIN-DELAY]``), and so is the EXPIRE where the
  backend can tell when a message arrived (UPDATE removes older messages).

Other fields are kept out of the way (Dovecot has many): unknown ones are ignored,
malformed known ones make the line invalid (logged, never its content).

A store that knows such policies offers ``async user_policy(user) -> UserPolicy |
None`` and the attribute ``per_user_capabilities`` (which of ``EXPIRE`` and
``LOGIN-DELAY`` vary between users); the session uses them for every way of logging
in (USER/PASS, APOP, SASL, GSSAPI).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from pypop.netaddr import in_networks

__all__ = [
    "MAX_EXPIRE_DAYS",
    "MAX_LOGIN_DELAY",
    "Network",
    "UserPolicy",
    "allowed_from",
    "parse_extra_fields",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_LOGIN_DELAY: Final = 7 * 86400
MAX_EXPIRE_DAYS: Final = 100 * 365
MAX_REASON: Final = 200
"""Longest ``reason`` sent to a client (it goes on one -ERR line)."""


@dataclass(frozen=True, slots=True)
class UserPolicy:
    """What the user database says about one user (None: the server's default)."""

    nologin: bool = False
    reason: str | None = None
    allow_nets: tuple[Network, ...] | None = None
    home: str | None = None
    mail: str | None = None
    login_delay: int | None = None
    expire: int | None = None
    """Days; ``-1`` is NEVER (RFC 2449 §6.7), 0 removes what was retrieved."""
    uid: int | None = None
    """The user's system uid (passwd-file field 3 or ``userdb_uid``): a per-user
    location must belong to it."""

    @property
    def expire_capa(self) -> str | None:
        """The EXPIRE capability argument for this user, or None (server's)."""
        if self.expire is None:
            return None
        return "NEVER" if self.expire < 0 else str(self.expire)


DEFAULT: Final = UserPolicy()


def _nets(value: str) -> tuple[Network, ...]:
    nets: list[Network] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "local":  # Dovecot: non-IP connections (none here)
            continue
        net = ipaddress.ip_network(item, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{mapped}/{max(0, net.prefixlen - 96)}", strict=False)
        nets.append(net)
    return tuple(nets)


def _integer(key: str, value: str, maximum: int) -> int:
    if not value.isdigit() or int(value) > maximum:
        raise ValueError(f"{key} must be a whole number from 0 to {maximum}")
    return int(value)


def _uid(value: str) -> int | None:
    """A numeric uid field; None for anything else (Dovecot also takes a system user's
    name there: such a location is served without the owner check)."""
    if value.isdigit() and int(value) < 1 << 32:
        return int(value)
    return None


def parse_extra_fields(text: str, *, home: str | None = None, uid: str | None = None) -> UserPolicy:
    """The policy in a passwd-file line's extra fields; ``ValueError`` (naming the
    field, never the value) if a known field is malformed."""
    fields = {"nologin": False}
    values: dict[str, str] = {}
    rest = text.strip()
    while rest:
        token, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        key, sep, value = token.partition("=")
        if key == "reason":
            # Dovecot's example reasons are sentences: take the rest of the line.
            values["reason"] = " ".join(f"{value} {rest}".split())
            break
        if key == "nologin":
            fields["nologin"] = not sep or value.lower() not in ("n", "no", "0", "false")
        elif sep:
            values[key] = value
    nets = None
    if "allow_nets" in values:
        try:
            nets = _nets(values["allow_nets"])
        except ValueError:
            raise ValueError("allow_nets is not a list of addresses and networks") from None
    delay = values.get("login_delay")
    expire = values.get("expire")
    expire_days: int | None = None
    if expire is not None:
        expire_days = (
            -1 if expire.upper() == "NEVER" else _integer("expire", expire, MAX_EXPIRE_DAYS)
        )
    home = values.get("userdb_home") or home or None
    mail = values.get("userdb_mail") or values.get("userdb_mail_path") or None
    location = home is not None or mail is not None
    reason = values.get("reason")
    if reason is not None:
        reason = "".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON] or None
    return UserPolicy(
        nologin=fields["nologin"],
        reason=reason,
        allow_nets=nets,
        home=home,
        mail=mail,
        login_delay=None if delay is None else _integer("login_delay", delay, MAX_LOGIN_DELAY),
        expire=expire_days,
        # Only a per-user location is checked against it: none, no policy to keep.
        uid=_uid(values.get("userdb_uid") or uid or "") if location else None,
    )


def allowed_from(policy: UserPolicy, host: str) -> bool:
    """True if ``policy.allow_nets`` lets a client at ``host`` (an IP address) in."""
    nets = policy.allow_nets
    if nets is None:
        return True
    return in_networks(host, nets)
