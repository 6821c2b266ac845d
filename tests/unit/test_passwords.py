"""Unit tests for ftps_gateway.passwords (cheap argon2 parameters throughout)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import pytest
from argon2 import PasswordHasher, Type, extract_parameters, profiles

from ftps_gateway.policy.passwords import (
    DEFAULT_PARAMETERS,
    PasswordVerifier,
    hash_password,
    is_argon2id_hash,
)

if TYPE_CHECKING:
    from argon2 import Parameters

CHEAP: Parameters = profiles.CHEAPEST
PASSWORD = "correct horse battery staple"


class SpyHasher(PasswordHasher):
    """A PasswordHasher that records every hash it is asked to verify.

    PasswordHasher uses __slots__, so its verify cannot be monkeypatched in place.
    """

    hashes: list[str]

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:  # noqa: A002
        self.hashes.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


def spy_on(verifier: PasswordVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Swap the verifier's hasher for a spy; return the list it records into."""
    spy = SpyHasher.from_parameters(CHEAP)
    assert isinstance(spy, SpyHasher)
    spy.hashes = []
    monkeypatch.setattr(verifier, "_hasher", spy)
    return spy.hashes


@pytest.fixture
def verifier() -> PasswordVerifier:
    return PasswordVerifier(CHEAP)


@pytest.fixture
def stored() -> str:
    return hash_password(PASSWORD, CHEAP)


def test_default_parameters_are_rfc9106_low_memory() -> None:
    """The production profile is RFC 9106's second recommendation, argon2id."""
    assert DEFAULT_PARAMETERS == profiles.RFC_9106_LOW_MEMORY
    assert DEFAULT_PARAMETERS.type is Type.ID


def test_hash_password_makes_argon2id_phc_string(stored: str) -> None:
    """hash_password returns an argon2id PHC string with the requested parameters."""
    assert stored.startswith("$argon2id$v=19$")
    params = extract_parameters(stored)
    assert (params.time_cost, params.memory_cost, params.parallelism) == (1, 8, 1)


def test_hash_password_salts() -> None:
    """Two hashes of one password differ (random salt)."""
    assert hash_password(PASSWORD, CHEAP) != hash_password(PASSWORD, CHEAP)


def test_hash_password_refuses_non_id_parameters() -> None:
    """Only argon2id parameters are accepted."""
    params = extract_parameters(PasswordHasher(1, 8, 1, type=Type.I).hash("x"))
    with pytest.raises(ValueError, match="argon2id"):
        hash_password("x", params)


def test_roundtrip(verifier: PasswordVerifier, stored: str) -> None:
    """The right password verifies."""
    assert verifier.verify(stored, PASSWORD) is True


def test_roundtrip_non_ascii() -> None:
    """Non-ASCII passwords verify (UTF-8 on both sides)."""
    verifier = PasswordVerifier(CHEAP)
    assert verifier.verify(hash_password("pässwörd-日本", CHEAP), "pässwörd-日本")


def test_default_hash_verifies_with_default_verifier() -> None:
    """hash_password and PasswordVerifier agree on the defaults (one real-cost run)."""
    assert PasswordVerifier().verify(hash_password(PASSWORD), PASSWORD)


@pytest.mark.parametrize(
    "attempt", ["wrong", "", PASSWORD.upper(), PASSWORD + " ", "\udcff"]
)
def test_wrong_password(verifier: PasswordVerifier, stored: str, attempt: str) -> None:
    """Any other password, even one that cannot be UTF-8 encoded, fails quietly."""
    assert verifier.verify(stored, attempt) is False


def test_wrong_password_is_not_logged_as_error(
    verifier: PasswordVerifier, stored: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password is an ordinary outcome: nothing is logged."""
    with caplog.at_level(logging.DEBUG):
        assert verifier.verify(stored, "wrong") is False
    assert caplog.records == []


def test_unknown_user_runs_dummy_verify(
    verifier: PasswordVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown user costs one real verification, against the dummy hash."""
    hashes = spy_on(verifier, monkeypatch)
    assert verifier.verify(None, PASSWORD) is False
    assert hashes == [verifier._dummy_hash]


def test_dummy_hash_uses_verifier_parameters(verifier: PasswordVerifier) -> None:
    """The dummy hash costs what a hash made by hash_password costs."""
    assert extract_parameters(verifier._dummy_hash) == extract_parameters(
        hash_password("x", CHEAP)
    )


def test_dummy_hash_made_once(
    verifier: PasswordVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dummy hash is made at construction, not per unknown-user attempt."""
    dummy = verifier._dummy_hash
    hashes = spy_on(verifier, monkeypatch)
    verifier.verify(None, "a")
    verifier.verify(None, "b")
    assert hashes == [dummy, dummy]


def test_known_user_does_not_touch_dummy(
    verifier: PasswordVerifier, stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A known user is verified once, against their own hash only."""
    hashes = spy_on(verifier, monkeypatch)
    verifier.verify(stored, "wrong")
    assert hashes == [stored]


MALFORMED = [
    "$argon2id$v=19$m=8,t=1,p=1$!!!!notbase64$@@@@",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ",
    "$argon2id$",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$é-non-ascii",
]


@pytest.mark.parametrize("bad_hash", MALFORMED)
def test_malformed_hash_fails_closed_and_is_not_logged(
    verifier: PasswordVerifier,
    bad_hash: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A malformed stored hash returns False, logs an error without the hash text,
    and still spends a dummy verification."""
    hashes = spy_on(verifier, monkeypatch)
    with caplog.at_level(logging.DEBUG):
        assert verifier.verify(bad_hash, PASSWORD) is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "malformed" in errors[0].getMessage()
    assert bad_hash not in caplog.text
    assert PASSWORD not in caplog.text
    assert hashes[-1] == verifier._dummy_hash


@pytest.mark.parametrize(
    "other",
    [
        "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        "$2b$12$abcdefghijklmnopqrstuuvwxyzabcdefghijklmnopqrstuvwx",
        "plaintext-password",
        "",
    ],
)
def test_unknown_scheme_fails_closed(
    verifier: PasswordVerifier,
    other: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hash without the $argon2id$ prefix (even argon2i) is refused, at full cost."""
    hashes = spy_on(verifier, monkeypatch)
    with caplog.at_level(logging.DEBUG):
        assert verifier.verify(other, PASSWORD) is False
    assert hashes == [verifier._dummy_hash]
    assert "unsupported scheme" in caplog.text
    if other:
        assert other not in caplog.text


def test_argon2i_hash_of_right_password_is_refused(
    verifier: PasswordVerifier,
) -> None:
    """argon2-cffi would accept an argon2i hash; the prefix dispatch does not."""
    argon2i = PasswordHasher(1, 8, 1, type=Type.I).hash(PASSWORD)
    assert verifier.verify(argon2i, PASSWORD) is False


def test_password_never_logged(
    verifier: PasswordVerifier, stored: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No path through verify logs the attempted password."""
    with caplog.at_level(logging.DEBUG):
        for stored_hash in (stored, None, "$argon2id$broken", "junk"):
            verifier.verify(stored_hash, PASSWORD)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (hash_password("x", CHEAP), True),
        (hash_password("x"), True),
        (PasswordHasher(1, 8, 1, type=Type.I).hash("x"), False),
        (PasswordHasher(1, 8, 1, type=Type.D).hash("x"), False),
        ("$argon2id$v=19$m=65536,t=3,p=4$$", False),  # no salt, no tag
        ("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaGhhc2g", False),  # 4-byte salt
        ("$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGE", False),  # 2-byte tag
        ("$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFz*GhhcA", False),  # bad base64
        ("$argon2id$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g", False),  # version 1.0
        ("$argon2id$v=19$m=8,t=1$c2FsdHNhbHQ$aGFzaGhhc2g", False),  # missing p
        ("$argon2id$v=19$m=x,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g", False),
        ("argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g", False),
        ("", False),
        ("secret", False),
    ],
)
def test_is_argon2id_hash(value: str, expected: bool) -> None:
    """is_argon2id_hash accepts well-formed argon2id strings only."""
    assert is_argon2id_hash(value) is expected


def test_recent_logins_remember_successes_for_a_while() -> None:
    from ftps_gateway.policy.passwords import RecentLogins

    now = [100.0]
    cache = RecentLogins(60, max_entries=2, clock=lambda: now[0])
    token = cache.token("$argon2id$hash-a", "secret")
    assert not cache.hit(token)
    cache.remember(token)
    assert cache.hit(token)
    assert not cache.hit(cache.token("$argon2id$hash-a", "other"))
    # A changed password (a new stored hash) misses at once.
    assert not cache.hit(cache.token("$argon2id$hash-b", "secret"))
    now[0] += 61
    assert not cache.hit(token)
    # Bounded: the oldest entries make room.
    tokens = [cache.token("h", str(i)) for i in range(3)]
    for item in tokens:
        cache.remember(item)
    assert [cache.hit(item) for item in tokens] == [False, True, True]


def test_recent_logins_never_hold_the_password() -> None:
    from ftps_gateway.policy.passwords import RecentLogins

    cache = RecentLogins(60)
    cache.remember(cache.token("$argon2id$h", "correct horse"))
    assert b"correct horse" not in b"".join(cache._entries)
    # Another process (another key) cannot recompute the token.
    assert RecentLogins(60).token("$argon2id$h", "correct horse") not in cache._entries


def test_recent_logins_off() -> None:
    from ftps_gateway.policy.passwords import RecentLogins

    cache = RecentLogins(0)
    token = cache.token("h", "p")
    cache.remember(token)
    assert not cache.hit(token)
