"""``pypop passwd``: print a ``{SCHEME}hash`` line for a passwd-file (like doveadm pw)."""

from __future__ import annotations

import argparse
import getpass
import sys

from pypop.auth import schemes
from pypop.auth.prep import try_password

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "passwd",
        help="hash a password for a passwd-file (like doveadm pw)",
        description="Hash a password for a Dovecot-style passwd-file.",
    )
    p.add_argument(
        "-s",
        "--scheme",
        default=schemes.DEFAULT_HASH_SCHEME,
        help=f"password scheme (default {schemes.DEFAULT_HASH_SCHEME}; -l lists them)",
    )
    p.add_argument(
        "-p",
        "--password",
        help="the password (visible to other local users in the process list; "
        "without -p it is asked for twice)",
    )
    p.add_argument("-l", "--list", action="store_true", help="list the schemes and exit")
    p.add_argument(
        "-t",
        "--test",
        metavar="HASH",
        help="check the password against HASH instead; exit status 0 if it matches",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(" ".join([*schemes.SCHEMES, "CLEARTEXT"]))
        return 0

    password: str | None = args.password
    if password is None:
        try:
            password = getpass.getpass("Enter new password: ")
            if args.test is None and getpass.getpass("Retype new password: ") != password:
                print("pypop passwd: passwords don't match", file=sys.stderr)
                return 1
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 1
    if not password:
        print("pypop passwd: empty passwords are not allowed", file=sys.stderr)
        return 1
    prepared = try_password(password)
    if prepared is None:
        # RFC 8265 OpaqueString (what the server compares): control characters,
        # unassigned code points and the like can never be typed in by a client.
        print("pypop passwd: the password has characters a login cannot use", file=sys.stderr)
        return 2
    password = prepared

    if args.test is not None:
        try:
            scheme, value = schemes.parse_stored(args.test, "CRYPT")
            ok = schemes.verify_scheme(scheme, value, password)
        except ValueError as exc:
            print(f"pypop passwd: {exc}", file=sys.stderr)
            return 2
        print(f"{{{scheme}}} ({'verified' if ok else 'NOT verified'})")
        return 0 if ok else 1

    try:
        hashed = schemes.hash_password(args.scheme, password)
    except schemes.UnknownSchemeError:
        print(f"pypop passwd: unknown scheme {args.scheme!r} (-l lists them)", file=sys.stderr)
        return 2
    except schemes.MissingHashLibraryError as exc:  # names the extra to install
        print(f"pypop passwd: {exc}", file=sys.stderr)
        return 2
    if any(c in hashed for c in ":\r\n"):
        print(
            "pypop passwd: this password cannot be stored in a passwd-file with this "
            "scheme (it contains ':' or a line break)",
            file=sys.stderr,
        )
        return 1
    print(hashed)
    return 0
