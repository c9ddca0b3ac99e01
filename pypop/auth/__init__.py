"""Authentication, sans-I/O: credential stores, SASL mechanisms, APOP, abuse control.

See :mod:`pypop.auth.store` (the store interface), :mod:`pypop.auth.passwd` (the
Dovecot passwd-file), :mod:`pypop.auth.sasl` (mechanisms), :mod:`pypop.auth.apop`,
:mod:`pypop.auth.penalty` (failure penalties, LOGIN-DELAY) and
:mod:`pypop.auth.concurrency` (the per-client cap on concurrent authentications).
"""

from pypop.auth.apop import verify_apop
from pypop.auth.concurrency import PerClientLimiter
from pypop.auth.passwd import PasswdFileStore
from pypop.auth.penalty import AuthPenalty, LoginDelay, client_key
from pypop.auth.sasl import (
    DEFAULT_MECHANISMS,
    SaslChallenge,
    SaslContext,
    SaslFailure,
    SaslMechanism,
    SaslResult,
    SaslSuccess,
    available_mechanisms,
    create_mechanism,
)
from pypop.auth.schemes import ScramKeys, UnknownSchemeError, hash_password
from pypop.auth.store import CredentialStore, MemoryCredentialStore, StoredCredential
from pypop.auth.tokens import StaticTokenVerifier, TokenVerifier

__all__ = [
    "DEFAULT_MECHANISMS",
    "AuthPenalty",
    "CredentialStore",
    "LoginDelay",
    "MemoryCredentialStore",
    "PasswdFileStore",
    "PerClientLimiter",
    "SaslChallenge",
    "SaslContext",
    "SaslFailure",
    "SaslMechanism",
    "SaslResult",
    "SaslSuccess",
    "ScramKeys",
    "StaticTokenVerifier",
    "StoredCredential",
    "TokenVerifier",
    "UnknownSchemeError",
    "available_mechanisms",
    "client_key",
    "create_mechanism",
    "hash_password",
    "verify_apop",
]
