"""Signatures (docs/contract.md §3) and key comparisons, against the docs' verification snippet.

Timing: `verify` and `key_matches` compare with `hmac.compare_digest`; a timing test would be
noise on shared CI cores, so these tests pin their behaviour instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from engine.core.crypto import SecretBox, hash_api_key, key_matches, new_api_key
from engine.core.signing import request_headers, sign, verify
from engine.store.webhooks import WebhookTarget

PROPERTY = settings(max_examples=200, deadline=None)

secrets_ = st.one_of(st.text(min_size=1, max_size=80), st.just("whsec_test_" + "a" * 40))
payloads = st.text(max_size=2000)


def contract_snippet(secret: str, payload: str, signature: str) -> bool:
    """The verification code from the public docs, unchanged."""
    expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.split("=")[1])


@PROPERTY
@given(secrets_, payloads)
def test_the_documented_snippet_accepts_our_signature(secret: str, payload: str) -> None:
    signature = sign(secret, payload.encode())
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert contract_snippet(secret, payload, signature)
    assert verify(secret, payload.encode(), signature)


@PROPERTY
@given(secrets_, payloads, payloads)
def test_any_other_body_fails(secret: str, payload: str, other: str) -> None:
    assume(other != payload)
    signature = sign(secret, payload.encode())
    assert not contract_snippet(secret, other, signature)
    assert not verify(secret, other.encode(), signature)


@PROPERTY
@given(secrets_, secrets_, payloads)
def test_any_other_secret_fails(secret: str, other: str, payload: str) -> None:
    assume(other != secret)
    signature = sign(secret, payload.encode())
    assert not contract_snippet(other, payload, signature)
    assert not verify(other, payload.encode(), signature)


@PROPERTY
@given(secrets_, payloads, st.integers(0, 63), st.sampled_from("0123456789abcdef"))
def test_one_changed_hex_digit_fails(secret: str, payload: str, at: int, digit: str) -> None:
    signature = sign(secret, payload.encode())
    hexpart = signature.removeprefix("sha256=")
    assume(hexpart[at] != digit)
    assert not verify(
        secret, payload.encode(), "sha256=" + hexpart[:at] + digit + hexpart[at + 1 :]
    )


@PROPERTY
@given(secrets_, payloads, st.text(max_size=100))
@example("s", "{}", "sha256=é")
@example("s", "{}", "")
@example("s", "{}", "sha256=\udcff")  # a header decoded with surrogateescape
def test_verify_answers_false_for_garbage_and_never_raises(
    secret: str, payload: str, garbage: str
) -> None:
    assume(garbage != sign(secret, payload.encode()))
    assert verify(secret, payload.encode(), garbage) is False


@PROPERTY
@given(secrets_, st.binary(max_size=500))
def test_signature_covers_raw_bytes_not_only_text(secret: str, body: bytes) -> None:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert sign(secret, body) == expected
    assert verify(secret, body, expected)


def test_headers_carry_the_signature_of_the_exact_body() -> None:
    body = b'{"event":"document.uploaded","data":{}}'
    headers = request_headers(
        secret="whsec_test_x", body=body, event_type="document.uploaded", delivery_id="dlv_1"
    )
    assert headers["X-CargoLint-Signature"] == sign("whsec_test_x", body)
    assert headers["X-CargoLint-Delivery"] == "dlv_1"
    assert "whsec_test_x" not in repr(headers)


def test_headers_during_a_rotation_sign_with_both_secrets() -> None:
    body = b'{"event":"document.uploaded","data":{}}'
    headers = request_headers(
        secret="whsec_test_old",
        body=body,
        event_type="document.uploaded",
        delivery_id="dlv_1",
        next_secret="whsec_test_new",
    )
    assert contract_snippet("whsec_test_old", body.decode(), headers["X-CargoLint-Signature"])
    assert contract_snippet("whsec_test_new", body.decode(), headers["X-CargoLint-Signature-Next"])
    without = request_headers(
        secret="whsec_test_new", body=body, event_type="document.uploaded", delivery_id="dlv_1"
    )
    assert "X-CargoLint-Signature-Next" not in without


def _rotated(expires_at: datetime | None) -> WebhookTarget:
    return WebhookTarget(
        id="wh_1",
        account_id="acct_1",
        mode="test",
        url="https://example.com/",
        events=("document.uploaded",),
        sealed="plain:whsec_test_new",
        active=True,
        box=SecretBox(()),
        previous_sealed="plain:whsec_test_old" if expires_at else None,
        previous_expires_at=expires_at,
    )


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (None, ("whsec_test_new", None)),  # never rotated, or rotated with no overlap
        (timedelta(seconds=1), ("whsec_test_old", "whsec_test_new")),  # in the overlap
        (timedelta(0), ("whsec_test_new", None)),  # the overlap ends at its instant
        (timedelta(seconds=-1), ("whsec_test_new", None)),  # and stays over
    ],
)
def test_signing_secrets_follow_the_overlap(
    expires_in: timedelta | None, expected: tuple[str, str | None]
) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    target = _rotated(None if expires_in is None else now + expires_in)
    assert target.signing_secrets(now) == expected


# ---------------------------------------------------------------- API keys


@PROPERTY
@given(st.sampled_from(["test", "live"]))
def test_api_keys_match_only_their_own_hash(mode: str) -> None:
    key = new_api_key(mode)
    other = new_api_key(mode)
    stored = hash_api_key(key)
    assert key.encode() not in stored  # the stored form does not contain the key
    assert len(stored) == 32
    assert key_matches(key, stored)
    assert not key_matches(other, stored)
    assert not key_matches(key[:-1], stored)
    assert not key_matches(key + "x", stored)
    assert not key_matches(key.upper(), stored)


@PROPERTY
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=80), st.binary(max_size=40))
def test_key_matches_never_raises_on_ascii_input(key: str, stored: bytes) -> None:
    assert key_matches(key, stored) == (hash_api_key(key) == stored)
