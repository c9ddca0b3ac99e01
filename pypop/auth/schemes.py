"""Password schemes of the Dovecot passwd-file: verify and hash.

Every function here is synchronous and some are CPU-heavy (the ``*-CRYPT`` and
``ARGON2*`` schemes): credential stores run them in a worker thread
(``trio.to_thread.run_sync`` with a bounded ``CapacityLimiter``).

Scheme names follow Dovecot (``doveadm pw -l``); the stored form is
``{SCHEME}data``. Libraries: ``bcrypt`` (BLF-CRYPT), ``argon2-cffi`` (ARGON2ID,
ARGON2I) and ``libpass`` (the maintained passlib fork; SHA256-CRYPT, SHA512-CRYPT,
MD5-CRYPT). Everything else is hashlib/hmac.

Those three come with the ``pypop3[hashes]`` extra and are imported only when an
entry needs them, so ``import pypop``, a client, and PLAIN, CRAM-MD5, SSHA512 and
SCRAM-SHA-256 entries work without them; an entry that needs a missing one raises
:class:`MissingHashLibraryError`, which names the extra.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import logging
import secrets
import stringprep
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pypop import wire

__all__ = [
    "DEFAULT_HASH_SCHEME",
    "HASHES_EXTRA",
    "SCHEMES",
    "MissingHashLibraryError",
    "ScramKeys",
    "UnknownSchemeError",
    "canonical_scheme",
    "cost_class",
    "hash_password",
    "is_heavy",
    "parse_stored",
    "saslprep",
    "scram_derive",
    "scram_keys_from_password",
    "validate_value",
    "verify_scheme",
]

log = logging.getLogger("pypop.auth")

DEFAULT_HASH_SCHEME = "BLF-CRYPT"
"""What ``pypop passwd`` uses without ``-s`` (doveadm's CRYPT gives bcrypt too)."""

BCRYPT_COST = 10
"""Work factor for new BLF-CRYPT hashes (doveadm uses 5, which is weak today)."""

SHA_CRYPT_ROUNDS = 5000
"""Drepper's default; the hash then carries no ``rounds=`` field, as doveadm's."""

ARGON2_TIME_COST = 3
ARGON2_MEMORY_COST = 65536  # KiB
ARGON2_PARALLELISM = 1  # libsodium (Dovecot's Argon2) verifies only p=1

SCRAM_ITERATIONS = 4096
"""RFC 7677 §4: at least 4096."""

_ALIASES = {"CLEARTEXT": "PLAIN", "CLEAR": "PLAIN"}


class UnknownSchemeError(ValueError):
    """The scheme is not one pypop can verify or produce."""


HASHES_EXTRA = "pypop3[hashes]"
"""The extra that brings every library below."""

_LIBRARIES: dict[str, tuple[str, str]] = {
    # scheme: (module, distribution)
    "BLF-CRYPT": ("bcrypt", "bcrypt"),
    "SHA256-CRYPT": ("passlib.hash", "libpass"),
    "SHA512-CRYPT": ("passlib.hash", "libpass"),
    "MD5-CRYPT": ("passlib.hash", "libpass"),
    "ARGON2ID": ("argon2", "argon2-cffi"),
    "ARGON2I": ("argon2", "argon2-cffi"),
}


class MissingHashLibraryError(ValueError):
    """A scheme needs a library of the ``pypop3[hashes]`` extra that is not installed."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.distribution = _LIBRARIES[scheme][1]
        super().__init__(
            f"{{{scheme}}} passwords need the {self.distribution} library, which is not "
            f"installed: pip install '{HASHES_EXTRA}'"
        )


@contextmanager
def _needs_library(scheme: str) -> Iterator[None]:
    """Turn the ImportError of a lazy ``import`` into :class:`MissingHashLibraryError`."""
    try:
        yield
    except ImportError as exc:
        raise MissingHashLibraryError(scheme) from exc


_reported_missing: set[str] = set()


def _check_library(scheme: str) -> None:
    """Import what ``scheme`` needs now (at load time), or log and raise why it cannot."""
    if scheme not in _LIBRARIES:
        return
    try:
        with _needs_library(scheme):
            importlib.import_module(_LIBRARIES[scheme][0])
    except MissingHashLibraryError as exc:
        # Once per scheme: the passwd-file loader then names every line it skips.
        if scheme not in _reported_missing:
            _reported_missing.add(scheme)
            log.error("%s", exc)
        raise


def canonical_scheme(scheme: str) -> str:
    """Upper-case a scheme name and fold Dovecot's aliases (CLEARTEXT -> PLAIN)."""
    upper = scheme.strip().upper()
    return _ALIASES.get(upper, upper)


def parse_stored(stored: str, default_scheme: str = "CRYPT") -> tuple[str, str]:
    """Split ``{SCHEME}data`` into (canonical scheme, data).

    A string without a ``{...}`` prefix uses ``default_scheme``. ``ValueError`` for an
    unterminated prefix.
    """
    if stored.startswith("{"):
        end = stored.find("}")
        if end < 0:
            raise ValueError("unterminated {SCHEME} prefix")
        return canonical_scheme(stored[1:end]), stored[end + 1 :]
    return canonical_scheme(default_scheme), stored


# --------------------------------------------------------------------------- SASLprep


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep (stored-strings profile); ``ValueError`` if prohibited."""
    if text.isascii() and all(0x20 <= ord(c) < 0x7F for c in text):
        return text  # the common case, and a no-op for printable ASCII
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    out = unicodedata.normalize("NFKC", mapped)
    for c in out:
        if (
            stringprep.in_table_c12(c)
            or stringprep.in_table_c21_c22(c)
            or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c)
            or stringprep.in_table_c5(c)
            or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c)
            or stringprep.in_table_c8(c)
            or stringprep.in_table_c9(c)
            or stringprep.in_table_a1(c)
        ):
            raise ValueError("SASLprep: prohibited character")
    if any(stringprep.in_table_d1(c) for c in out):
        if any(stringprep.in_table_d2(c) for c in out):
            raise ValueError("SASLprep: mixed bidirectional text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("SASLprep: RandALCat text must start and end with one")
    return out


def _scram_password(password: str) -> bytes:
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8")


# --------------------------------------------------------------------------- SCRAM keys


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What a SCRAM-SHA-256 server keeps (RFC 5802 §3): never the password."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def dovecot(self) -> str:
        """Dovecot's stored form: ``iter,salt,StoredKey,ServerKey`` (base64 fields)."""
        b64 = base64.b64encode
        return (
            f"{self.iterations},{b64(self.salt).decode()},"
            f"{b64(self.stored_key).decode()},{b64(self.server_key).decode()}"
        )

    @classmethod
    def parse(cls, value: str) -> ScramKeys:
        """Parse Dovecot's form; ``ValueError`` if malformed."""
        parts = value.split(",")
        if len(parts) != 4:
            raise ValueError("SCRAM-SHA-256: expected 4 comma-separated fields")
        iterations = int(parts[0])
        if iterations < 1:
            raise ValueError("SCRAM-SHA-256: bad iteration count")
        try:
            salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
        except binascii.Error as exc:
            raise ValueError("SCRAM-SHA-256: bad base64") from exc
        if not salt or len(stored) != 32 or len(server) != 32:
            raise ValueError("SCRAM-SHA-256: bad key lengths")
        return cls(iterations, salt, stored, server)


def scram_derive(password: str, salt: bytes, iterations: int) -> tuple[bytes, ScramKeys]:
    """RFC 5802 §3 key derivation with SHA-256 (password SASLprep'd when it can be):
    the ClientKey (the client role needs it for its proof) and the server's keys."""
    salted = hashlib.pbkdf2_hmac("sha256", _scram_password(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, ScramKeys(iterations, salt, stored_key, server_key)


def scram_keys_from_password(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """RFC 5802 §3: what a server keeps, derived from the password."""
    return scram_derive(password, salt, iterations)[1]


# --------------------------------------------------------------------------- the schemes


def _ct_eq(a: bytes, b: bytes) -> bool:
    return wire.constant_time_eq(a, b)


def _verify_plain(value: str, password: str) -> bool:
    # Compare digests so that the time does not depend on the length either.
    return _ct_eq(
        hashlib.sha256(value.encode("utf-8")).digest(),
        hashlib.sha256(password.encode("utf-8")).digest(),
    )


def _verify_cram(value: str, password: str) -> bool:
    return _ct_eq(bytes.fromhex(value), wire.cram_md5_context(password.encode("utf-8")))


def _hash_cram(password: str) -> str:
    return wire.cram_md5_context(password.encode("utf-8")).hex()


def _verify_ssha512(value: str, password: str) -> bool:
    raw = base64.b64decode(value, validate=True)
    if len(raw) <= 64:
        raise ValueError("SSHA512: no salt")
    digest, salt = raw[:64], raw[64:]
    return _ct_eq(digest, hashlib.sha512(password.encode("utf-8") + salt).digest())


def _hash_ssha512(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.sha512(password.encode("utf-8") + salt).digest()
    return base64.b64encode(digest + salt).decode("ascii")


def _bcrypt_password(password: str) -> bytes:
    # crypt(3) and older bcrypt releases use the first 72 octets; bcrypt 5 refuses more.
    return password.encode("utf-8")[:72]


def _verify_bcrypt(value: str, password: str) -> bool:
    with _needs_library("BLF-CRYPT"):
        import bcrypt

    if not value.startswith(("$2a$", "$2b$", "$2y$")):
        raise ValueError("BLF-CRYPT: not a $2a$/$2b$/$2y$ hash")
    return bcrypt.checkpw(_bcrypt_password(password), value.encode("ascii"))


def _hash_bcrypt(password: str) -> str:
    with _needs_library("BLF-CRYPT"):
        import bcrypt

    hashed = bcrypt.hashpw(_bcrypt_password(password), bcrypt.gensalt(rounds=BCRYPT_COST))
    # $2b$ and $2y$ are the same algorithm; doveadm writes $2y$.
    return "$2y$" + hashed.decode("ascii")[4:]


def _sha_crypt(which: str) -> object:
    with _needs_library(which.replace("_", "-").upper()):
        from passlib import hash as passlib_hash  # type: ignore[import-untyped]

    return getattr(passlib_hash, which)


def _verify_sha_crypt(which: str, prefix: str) -> Callable[[str, str], bool]:
    def verify(value: str, password: str) -> bool:
        if not value.startswith(prefix):
            raise ValueError(f"{which}: wrong prefix")
        handler = _sha_crypt(which)
        return bool(handler.verify(password, value))  # type: ignore[attr-defined]

    return verify


def _hash_sha_crypt(which: str) -> Callable[[str], str]:
    def hash_(password: str) -> str:
        handler = _sha_crypt(which)
        return str(handler.using(rounds=SHA_CRYPT_ROUNDS).hash(password))  # type: ignore[attr-defined]

    return hash_


def _hash_md5_crypt(password: str) -> str:
    return str(_sha_crypt("md5_crypt").hash(password))  # type: ignore[attr-defined]


def _verify_argon2(prefix: str) -> Callable[[str, str], bool]:
    def verify(value: str, password: str) -> bool:
        with _needs_library("ARGON2ID" if prefix == "$argon2id$" else "ARGON2I"):
            from argon2 import PasswordHasher
            from argon2.exceptions import InvalidHashError, VerificationError

        if not value.startswith(prefix):
            raise ValueError("ARGON2: wrong variant")
        try:
            return PasswordHasher().verify(value, password)
        except VerificationError:
            return False
        except InvalidHashError as exc:
            raise ValueError("ARGON2: malformed hash") from exc

    return verify


def _hash_argon2(type_name: str) -> Callable[[str], str]:
    def hash_(password: str) -> str:
        with _needs_library(f"ARGON2{type_name}"):
            from argon2 import PasswordHasher, Type

        hasher = PasswordHasher(
            time_cost=ARGON2_TIME_COST,
            memory_cost=ARGON2_MEMORY_COST,
            parallelism=ARGON2_PARALLELISM,
            hash_len=32,
            salt_len=16,
            type=Type[type_name],
        )
        return hasher.hash(password)

    return hash_


def _verify_scram(value: str, password: str) -> bool:
    keys = ScramKeys.parse(value)
    derived = scram_keys_from_password(password, keys.salt, keys.iterations)
    return _ct_eq(derived.stored_key, keys.stored_key) and _ct_eq(
        derived.server_key, keys.server_key
    )


def _hash_scram(password: str) -> str:
    return scram_keys_from_password(password, secrets.token_bytes(16), SCRAM_ITERATIONS).dovecot()


_CRYPT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("$2a$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$1$", "MD5-CRYPT"),
)


def _crypt_target(value: str) -> str:
    for prefix, scheme in _CRYPT_PREFIXES:
        if value.startswith(prefix):
            return scheme
    raise ValueError("CRYPT: unsupported crypt(3) format (DES, yescrypt, ...)")


def _verify_crypt(value: str, password: str) -> bool:
    return SCHEMES[_crypt_target(value)].verify(value, password)


def _hash_crypt(password: str) -> str:
    return _hash_bcrypt(password)


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    verify: Callable[[str, str], bool]
    hash: Callable[[str], str]
    heavy: bool
    """True when a verification costs enough CPU to belong in a worker thread."""
    plaintext_equivalent: bool = False
    """True when the stored value is the password itself (APOP, CRAM-MD5, SCRAM can use it)."""


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("PLAIN", _verify_plain, lambda p: p, heavy=False, plaintext_equivalent=True),
        Scheme("CRAM-MD5", _verify_cram, _hash_cram, heavy=False),
        Scheme("SSHA512", _verify_ssha512, _hash_ssha512, heavy=False),
        Scheme(
            "SHA256-CRYPT",
            _verify_sha_crypt("sha256_crypt", "$5$"),
            _hash_sha_crypt("sha256_crypt"),
            heavy=True,
        ),
        Scheme(
            "SHA512-CRYPT",
            _verify_sha_crypt("sha512_crypt", "$6$"),
            _hash_sha_crypt("sha512_crypt"),
            heavy=True,
        ),
        Scheme("MD5-CRYPT", _verify_sha_crypt("md5_crypt", "$1$"), _hash_md5_crypt, heavy=True),
        Scheme("BLF-CRYPT", _verify_bcrypt, _hash_bcrypt, heavy=True),
        Scheme("CRYPT", _verify_crypt, _hash_crypt, heavy=True),
        Scheme("ARGON2ID", _verify_argon2("$argon2id$"), _hash_argon2("ID"), heavy=True),
        Scheme("ARGON2I", _verify_argon2("$argon2i$"), _hash_argon2("I"), heavy=True),
        Scheme("SCRAM-SHA-256", _verify_scram, _hash_scram, heavy=True),
    )
}


def _scheme(name: str) -> Scheme:
    try:
        return SCHEMES[canonical_scheme(name)]
    except KeyError:
        raise UnknownSchemeError(f"unknown password scheme {name!r}") from None


def is_heavy(scheme: str) -> bool:
    return _scheme(scheme).heavy


def validate_value(scheme: str, value: str) -> None:
    """Cheap syntax check of a stored value; ``ValueError`` if it can never verify.

    :class:`MissingHashLibraryError` (a ``ValueError``, logged once per scheme) when
    the library the scheme needs is not installed.
    """
    name = canonical_scheme(scheme)
    _scheme(name)
    _check_library(_crypt_target(value) if name == "CRYPT" else name)
    if name == "CRAM-MD5":
        if len(value) != 64:
            raise ValueError("CRAM-MD5: expected 64 hex digits")
        bytes.fromhex(value)
    elif name == "SCRAM-SHA-256":
        ScramKeys.parse(value)
    elif name == "SSHA512":
        raw = base64.b64decode(value, validate=True)
        if len(raw) <= 64:
            raise ValueError("SSHA512: no salt")
    elif name == "CRYPT":
        _crypt_target(value)
    elif name in ("BLF-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "MD5-CRYPT"):
        prefixes = [p for p, s in _CRYPT_PREFIXES if s == name]
        if not value.startswith(tuple(prefixes)):
            raise ValueError(f"{name}: wrong prefix")
    elif name in ("ARGON2ID", "ARGON2I") and not value.startswith(f"${name.lower()}$"):
        raise ValueError(f"{name}: wrong prefix")


def cost_class(scheme: str, value: str) -> tuple[str, str]:
    """What a verification of this entry costs: (the algorithm that runs, its cost
    parameters). Entries with equal classes take the same time to verify, so the
    dummy verification for unknown users copies the most common class.

    ``CRYPT`` is classed by the crypt(3) format it holds (``$2y$10$`` bcrypt is
    BLF-CRYPT at cost 10 whichever prefix names it)."""
    name = canonical_scheme(scheme)
    if name == "CRYPT":
        try:
            name = _crypt_target(value)
        except ValueError:
            return name, ""
    if name == "BLF-CRYPT":
        return name, value[4:7]  # "$2y$10$..." -> "10$"
    if name in ("SHA256-CRYPT", "SHA512-CRYPT"):
        rounds = value.split("$")[2] if value.count("$") >= 3 else ""
        return name, rounds if rounds.startswith("rounds=") else ""
    if name in ("ARGON2ID", "ARGON2I"):
        fields = value.split("$")
        return name, "$".join(fields[2:4]) if len(fields) > 4 else ""
    if name == "SCRAM-SHA-256":
        return name, value.split(",", 1)[0]
    return name, ""


def verify_scheme(scheme: str, value: str, password: str) -> bool:
    """True if ``password`` matches the stored ``value`` of ``scheme``.

    ``UnknownSchemeError`` for a scheme pypop does not know,
    :class:`MissingHashLibraryError` for one whose library is not installed; a
    malformed stored value is logged (without its content) and gives False.
    """
    entry = _scheme(scheme)
    try:
        return entry.verify(value, password)
    except MissingHashLibraryError:
        raise  # not the stored value's fault: the caller says what to install
    except (ValueError, TypeError, binascii.Error) as exc:
        log.warning("stored %s value is malformed (%s)", entry.name, type(exc).__name__)
        return False


def hash_password(scheme: str, password: str) -> str:
    """``{SCHEME}data`` for ``password``, like ``doveadm pw -s SCHEME -p PASSWORD``."""
    entry = _scheme(scheme)
    label = canonical_scheme(scheme) if scheme.upper() not in _ALIASES else scheme.upper()
    return "{" + label + "}" + entry.hash(password)
