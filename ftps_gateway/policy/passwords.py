"""Password hashing and verification: argon2id PHC strings, prefix-dispatched.

Plain Python (no pyftpdlib import). Verification never raises for bad input and never
logs a password or a hash: a login either succeeds or it does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from argon2 import PasswordHasher, Type, extract_parameters, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

if TYPE_CHECKING:
    from collections.abc import Callable

    from argon2 import Parameters

__all__ = [
    "ARGON2ID_PREFIX",
    "DEFAULT_PARAMETERS",
    "PasswordVerifier",
    "RecentLogins",
    "hash_password",
    "is_argon2id_hash",
]

_log = logging.getLogger(__name__)

ARGON2ID_PREFIX = "$argon2id$"
_ARGON2_VERSION = 0x13  # "v=19", the only version RFC 9106 defines
_MIN_SALT_BYTES = 8  # argon2 reference implementation's ARGON2_MIN_SALT_LENGTH
_MIN_TAG_BYTES = 4  # ARGON2_MIN_OUTLEN
_B64 = re.compile(r"[A-Za-z0-9+/]+")  # PHC strings use unpadded standard base64

# RFC 9106 section 4, "second recommended option": argon2id, t=3, m=64 MiB, p=4. The
# first option needs 2 GiB per verification, which a server that verifies concurrent
# logins cannot afford. This is also PasswordHasher's default today, but pinning the
# profile means an argon2-cffi upgrade cannot silently change the cost of new hashes
# (or of the dummy verification that must cost the same as a real one). Each
# verification allocates 64 MiB while it runs: size worker threads accordingly.
DEFAULT_PARAMETERS: Parameters = profiles.RFC_9106_LOW_MEMORY


def _encode(password: str) -> bytes:
    """Encode a password the same way for hashing and verifying, without raising.

    ``surrogatepass`` lets a password holding lone surrogates (possible if the control
    channel decodes with ``surrogateescape``) be verified, and fail, at full cost
    instead of raising before any argon2 work is done.
    """
    return password.encode("utf-8", "surrogatepass")


def _hasher(parameters: Parameters) -> PasswordHasher:
    if parameters.type is not Type.ID:
        raise ValueError("only argon2id parameters are supported")
    return PasswordHasher.from_parameters(parameters)


def hash_password(password: str, parameters: Parameters | None = None) -> str:
    """Return an argon2id PHC string (``$argon2id$v=19$m=...``) for ``password``.

    Args:
        password: The clear-text password. Never logged.
        parameters: argon2 cost parameters; ``DEFAULT_PARAMETERS`` (RFC 9106
            low-memory) unless a test asks for cheap ones.
    """
    return _hasher(parameters or DEFAULT_PARAMETERS).hash(_encode(password))


def is_argon2id_hash(value: str) -> bool:
    """Return True if ``value`` looks like a usable argon2id PHC string.

    For configuration checks, so that a pasted-in typo fails at load time rather than
    at a partner's first login. ``extract_parameters`` alone accepts an empty salt and
    tag and the pre-RFC version 0x10, so the salt and tag are also checked for
    argon2's minimum lengths (8 and 4 bytes) and their base64 alphabet.
    """
    if not value.startswith(ARGON2ID_PREFIX):
        return False
    try:
        parameters = extract_parameters(value)
    except ValueError:  # InvalidHashError is a ValueError
        return False
    salt, tag = value.split("$")[-2:]
    return (
        parameters.type is Type.ID
        and parameters.version == _ARGON2_VERSION
        and parameters.salt_len >= _MIN_SALT_BYTES
        and parameters.hash_len >= _MIN_TAG_BYTES
        and _B64.fullmatch(salt) is not None
        and _B64.fullmatch(tag) is not None
    )


class PasswordVerifier:
    """Check a password against a stored hash, at the same cost whether or not the
    user exists.

    One instance serves the whole server: the dummy hash is made once, at
    construction, with the same parameters as ``hash_password`` uses, so an unknown
    user costs one full argon2 verification, just like a known one. Comparison in
    constant time is argon2's job.
    """

    def __init__(self, parameters: Parameters | None = None) -> None:
        """Build the verifier and its dummy hash.

        Args:
            parameters: The parameters stored hashes were made with (the dummy must
                cost the same as they do). Tests pass ``argon2.profiles.CHEAPEST``.
        """
        self._hasher = _hasher(parameters or DEFAULT_PARAMETERS)
        # A random password nobody knows: the dummy verification always fails.
        self._dummy_hash = self._hasher.hash(secrets.token_bytes(32))
        # Dispatch on the PHC prefix so another scheme (e.g. a migration from bcrypt)
        # is one more entry, not a rewrite. argon2i/argon2d are deliberately absent.
        self._schemes: dict[str, Callable[[str, bytes], bool]] = {
            ARGON2ID_PREFIX: self._verify_argon2,
        }

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Return True only if ``password`` matches ``stored_hash``.

        Args:
            stored_hash: The user's PHC string, or None for an unknown user.
            password: The clear-text attempt. Never logged.

        Returns:
            False for an unknown user, a wrong password, an unsupported scheme or a
            malformed hash; never raises for any of these. Each of them still costs
            one argon2 verification, so response time does not tell them apart.
        """
        secret = _encode(password)
        if stored_hash is None:
            self._burn(secret)
            return False
        for prefix, scheme in self._schemes.items():
            if stored_hash.startswith(prefix):
                return scheme(stored_hash, secret)
        _log.error("stored password hash uses an unsupported scheme; login refused")
        self._burn(secret)
        return False

    def _verify_argon2(self, stored_hash: str, secret: bytes) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError, UnicodeError):
            # Deliberately not _log.exception: no traceback and no hash text in the
            # log, since a hash is a secret equivalent (offline guessing).
            # UnicodeError: argon2-cffi encodes the hash as ASCII before parsing it.
            _log.error("stored password hash is malformed; login refused")
            self._burn(secret)
            return False

    def _burn(self, secret: bytes) -> None:
        """Spend one real verification on the dummy hash; the result is irrelevant."""
        with contextlib.suppress(VerificationError):
            self._hasher.verify(self._dummy_hash, secret)


class RecentLogins:
    """Credentials verified a short while ago, so repeat logins skip argon2id.

    Partner automation often logs in every few seconds; at 64 MiB and tens of
    milliseconds per argon2id verification, that alone can fill a core. A
    successful verification is remembered as HMAC-SHA256(process key, stored hash,
    password) for ``ttl_seconds``: never the password, and the stored hash is part
    of the key, so a changed password misses at once (and a reload builds a new,
    empty cache). Failures are never remembered, so guessing gains nothing.
    """

    def __init__(
        self,
        ttl_seconds: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def token(self, stored_hash: str, password: str) -> bytes:
        """The key a successful verification of this pair is remembered under."""
        message = (
            stored_hash.encode() + b"\0" + password.encode("utf-8", "surrogateescape")
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def hit(self, token: bytes) -> bool:
        """True if ``token`` was verified within the last ``ttl_seconds``."""
        if self._ttl <= 0:
            return False
        now = self._clock()
        with self._lock:
            expires = self._entries.get(token)
            if expires is None:
                return False
            if expires <= now:
                del self._entries[token]
                return False
            return True

    def remember(self, token: bytes) -> None:
        """Record a successful verification (the oldest entries make room)."""
        if self._ttl <= 0:
            return
        with self._lock:
            self._entries[token] = self._clock() + self._ttl
            self._entries.move_to_end(token)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
