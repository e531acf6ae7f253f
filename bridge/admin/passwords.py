"""The ``[admin] Password`` value: a password, or a hash of one.

A value that starts with ``scrypt:`` or ``pbkdf2:`` is a hash in the format
Werkzeug's ``generate_password_hash`` writes (so existing tooling makes
them too), checked with the standard library's ``hashlib``:

- ``scrypt:N:r:p$SALT$HEX`` — ``hashlib.scrypt`` (64-byte key); the default
  here is N=32768, r=8, p=1 (32 MiB, about a tenth of a second);
- ``pbkdf2:sha256:ITERATIONS$SALT$HEX`` — ``hashlib.pbkdf2_hmac``.

Anything else is the password itself (best given as ``env:`` or ``file:``).
Comparisons are constant-time. ``python -m bridge.admin.passwords`` reads a
password (without echo) and prints its scrypt hash for the config.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass

SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
SCRYPT_DKLEN = 64
PBKDF2_DIGESTS = ("sha256", "sha512")
MAX_SCRYPT_N = 1 << 20  # 1 GiB at r=8: beyond this a hash is a mistake (or an attack on the host)
MAX_PBKDF2_ITERATIONS = 10_000_000


class PasswordFormatError(ValueError):
    """A value that says it is a hash but cannot be read as one."""


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """How a login is checked against the configured value."""

    method: str  # "plain" | "scrypt" | "pbkdf2"
    params: tuple[int, ...]
    digest: str
    salt: bytes
    expected: bytes

    def verify(self, password: str) -> bool:
        """Constant-time check (the hash's cost for hashes: run it off the event loop)."""
        given = password.encode("utf-8", "surrogatepass")
        if self.method == "plain":
            # equal-length digests: the comparison's time says nothing about the length
            return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected)
        if self.method == "scrypt":
            n, r, p = self.params
            got = hashlib.scrypt(given, salt=self.salt, n=n, r=r, p=p, maxmem=132 * n * r * p, dklen=len(self.expected))
        else:
            got = hashlib.pbkdf2_hmac(self.digest, given, self.salt, self.params[0], dklen=len(self.expected))
        return hmac.compare_digest(got, self.expected)


def is_hash(value: str) -> bool:
    return value.startswith(("scrypt:", "pbkdf2:"))


def parse_password(value: str) -> PasswordCheck:
    """The check for a configured ``Password``; ``PasswordFormatError`` names
    what is wrong with a hash (never echoing it)."""
    if not is_hash(value):
        return PasswordCheck("plain", (), "", b"", hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest())
    method_part, sep1, rest = value.partition("$")
    salt, sep2, hexed = rest.partition("$")
    if not (sep1 and sep2 and salt):
        raise PasswordFormatError("a hash is METHOD$SALT$HEX (scrypt:N:r:p$… or pbkdf2:sha256:ITERATIONS$…)")
    try:
        expected = bytes.fromhex(hexed)
    except ValueError:
        raise PasswordFormatError("the hash's last part must be hexadecimal") from None
    if not 16 <= len(expected) <= 128:
        raise PasswordFormatError("the hash's key must be 16 to 128 bytes")
    fields = method_part.split(":")
    if fields[0] == "scrypt":
        if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]):
            raise PasswordFormatError("scrypt hashes start scrypt:N:r:p (numbers)")
        n, r, p = (int(f) for f in fields[1:])
        if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise PasswordFormatError(f"scrypt N must be a power of two up to {MAX_SCRYPT_N}, r 1..32, p 1..16")
        return PasswordCheck("scrypt", (n, r, p), "", salt.encode(), expected)
    if len(fields) != 3 or fields[1] not in PBKDF2_DIGESTS or not fields[2].isdigit():
        raise PasswordFormatError(f"pbkdf2 hashes start pbkdf2:DIGEST:ITERATIONS, DIGEST one of {PBKDF2_DIGESTS}")
    iterations = int(fields[2])
    if not 1000 <= iterations <= MAX_PBKDF2_ITERATIONS:
        raise PasswordFormatError(f"pbkdf2 iterations must be 1000 to {MAX_PBKDF2_ITERATIONS}")
    return PasswordCheck("pbkdf2", (iterations,), fields[1], salt.encode(), expected)


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """An scrypt hash of ``password`` in the format ``parse_password`` reads."""
    salt = secrets.token_urlsafe(12)  # 16 characters, never "$"
    key = hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"), salt=salt.encode(), n=n, r=r, p=p, maxmem=132 * n * r * p,
        dklen=SCRYPT_DKLEN,
    )  # fmt: skip
    return f"scrypt:{n}:{r}:{p}${salt}${key.hex()}"


def main() -> int:
    """Read a password twice without echo (or once from a pipe); print its hash."""
    if sys.stdin.isatty():
        first = getpass.getpass("admin password: ")
        if first != getpass.getpass("again: "):
            print("the two passwords differ", file=sys.stderr)
            return 2
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if len(first) < 8:
        print("use at least 8 characters", file=sys.stderr)
        return 2
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
