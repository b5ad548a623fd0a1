"""Table tests for the pure core: events, payload, signing, backoff, ids, rate limits."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from random import Random

import orjson
import pytest

from engine.core import backoff, events, payload, signing
from engine.core.ids import delivery_id, new_id
from engine.core.ratelimit import TokenBucket

NOW = datetime(2026, 3, 2, 11, 45, tzinfo=UTC)

VALID = {
    "id": "evt_8f2c1a",
    "event": "document.uploaded",
    "accountId": "acct_123",
    "mode": "live",
    "timestamp": "2026-03-02T11:45:00Z",
    "data": {
        "document": {
            "id": "doc_abc123",
            "fileName": "invoice.pdf",
            "documentType": "invoice",
            "status": "processing",
        }
    },
}


def message(**changes: object) -> bytes:
    body = {**VALID, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def test_parse_event_accepts_the_contract_example() -> None:
    event = events.parse_event(message())
    assert event.id == "evt_8f2c1a"
    assert event.type == "document.uploaded"
    assert event.account_id == "acct_123"
    assert event.mode == "live"
    assert event.timestamp == "2026-03-02T11:45:00Z"
    assert orjson.loads(event.data) == VALID["data"]


def test_mode_defaults_to_live() -> None:
    raw = orjson.loads(message())
    del raw["mode"]
    assert events.parse_event(orjson.dumps(raw)).mode == "live"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "schema_invalid"),
        (message(event="document.deleted"), "unknown_event_type"),
        (message(event=None), "unknown_event_type"),
        (message(mode="staging"), "schema_invalid"),
        (message(timestamp="yesterday"), "schema_invalid"),
        (message(id=""), "schema_invalid"),
        # Postgres text cannot hold NUL: such an id could never be stored.
        (message(id="evt_\x00"), "schema_invalid"),
        (message(accountId="acct_\x00"), "schema_invalid"),
        (message(data={"document": {"id": "d"}}), "schema_invalid"),
        (message(event="compliance.warning"), "schema_invalid"),  # no warnings
        (b'{"pad": "' + b"x" * (256 * 1024) + b'"}', "too_large"),
    ],
)
def test_parse_event_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(events.InvalidEventError) as caught:
        events.parse_event(body)
    assert caught.value.reason == reason


def test_every_event_type_accepts_its_sample_data() -> None:
    for event_type in events.EVENT_TYPES:
        body = message(event=event_type, data=payload.sample_data(event_type))
        assert events.parse_event(body).type == event_type


def test_build_body_is_compact_and_keeps_data_and_timestamp_exactly() -> None:
    data = orjson.dumps(VALID["data"])
    body = payload.build_body(
        event_type="document.uploaded",
        timestamp="2026-03-02T11:45:00.120+01:00",
        webhook_id="wh_abc",
        delivery_id="dlv_x",
        data=data,
    )
    assert b" " not in body.replace(b"invoice.pdf", b"")
    parsed = orjson.loads(body)
    assert parsed == {
        "event": "document.uploaded",
        "timestamp": "2026-03-02T11:45:00.120+01:00",
        "webhookId": "wh_abc",
        "deliveryId": "dlv_x",
        "data": VALID["data"],
    }
    assert list(parsed) == ["event", "timestamp", "webhookId", "deliveryId", "data"]


def test_test_body_says_test() -> None:
    body = payload.build_body(
        event_type="compliance.warning",
        timestamp="t",
        webhook_id="wh_a",
        delivery_id="dlv_b",
        data=b"{}",
        test=True,
    )
    assert orjson.loads(body)["test"] is True


@pytest.mark.parametrize(
    ("event_type", "prefix"),
    [
        ("document.uploaded", "doc_test_"),
        ("compliance.warning", "doc_test_"),
        ("document.batch_downloaded", "batch_test_"),
    ],
)
def test_sample_data_ids(event_type: str, prefix: str) -> None:
    data = payload.sample_data(event_type)
    key = "batch" if prefix == "batch_test_" else "document"
    assert data[key]["id"].startswith(prefix)


def test_signature_passes_the_contracts_snippet() -> None:
    secret = "whsec_test_" + "a" * 40
    body = payload.build_body(
        event_type="document.uploaded",
        timestamp="t",
        webhook_id="wh_a",
        delivery_id="dlv_b",
        data=b'{"x":"\xc3\xa9"}',
    )
    headers = signing.request_headers(
        secret=secret, body=body, event_type="document.uploaded", delivery_id="dlv_b"
    )
    signature = headers["X-CargoLint-Signature"]
    payload_text = body.decode()
    expected = hmac.new(secret.encode(), payload_text.encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, signature.split("=")[1])
    assert signing.verify(secret, body, signature)
    assert not signing.verify(secret, body + b" ", signature)
    assert headers["User-Agent"].startswith("CargoLint-Webhooks/")
    assert headers["X-CargoLint-Delivery"] == "dlv_b"
    assert headers["X-CargoLint-Event"] == "document.uploaded"
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("200ms", 0.2),
        ("5s", 5),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("7", 7),
        (" 1.5s ", 1.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert backoff.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "-1s", "s", "1 2s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        backoff.parse_duration(text)


def test_default_schedule_is_the_contracts() -> None:
    assert backoff.parse_schedule("5s,5m,30m,2h,5h,10h,10h") == backoff.DEFAULT_SCHEDULE
    assert backoff.max_attempts(backoff.DEFAULT_SCHEDULE) == 8


@pytest.mark.parametrize(
    ("attempts", "retry_after", "low", "high"),
    [
        (1, None, 0.2, 0.22),
        (2, None, 1.0, 1.1),
        (3, None, 2.0, 2.2),
        (1, 30.0, 30.0, 30.0),  # Retry-After longer than the schedule wins
        (2, 0.5, 1.0, 1.1),  # ...and a shorter one does not shorten it
        (1, 99999.0, 3600.0, 3600.0),  # capped at one hour
    ],
)
def test_next_delay(attempts: int, retry_after: float | None, low: float, high: float) -> None:
    schedule = backoff.parse_schedule("200ms,1s,2s")
    delay = backoff.next_delay(attempts, schedule, retry_after=retry_after, rng=Random(1))
    assert delay is not None
    assert low <= delay <= high


def test_no_delay_after_the_last_attempt() -> None:
    assert backoff.next_delay(3, (1.0, 2.0)) is None
    assert backoff.next_delay(0, (1.0, 2.0)) is None


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("7200", 3600.0),
        ("Mon, 02 Mar 2026 11:46:00 GMT", 60.0),
        ("Mon, 02 Mar 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert backoff.parse_retry_after(header, NOW) == seconds


def test_delivery_id_is_deterministic_and_distinct() -> None:
    a = delivery_id("wh_1", "acct_1", "evt_1")
    assert a == delivery_id("wh_1", "acct_1", "evt_1")
    assert a != delivery_id("wh_2", "acct_1", "evt_1")
    assert a != delivery_id("wh_1", "acct_1", "evt_2")
    assert a.startswith("dlv_")
    assert len(a) == 28


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (("wh_1", "acct_1", "evt_1"), "dlv_p95rja95fxzvizeyn88fis2a"),
        (("wh_k3j2", "acct_9", "evt_2026-11-28"), "dlv_czopbqcga4zexcwjnuwad1ab"),
    ],
)
def test_delivery_ids_stay_what_earlier_versions_made(
    ids: tuple[str, str, str], expected: str
) -> None:
    # A message redelivered across an upgrade must map onto the rows it already made.
    assert delivery_id(*ids) == expected


def test_new_id_shape() -> None:
    ident = new_id("wh")
    assert ident.startswith("wh_")
    assert len(ident) == 23
    assert ident[3:].isalnum()
    assert ident[3:] == ident[3:].lower()


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == pytest.approx(0.1)
    assert bucket.try_take(0.05) == pytest.approx(0.05)
    assert bucket.try_take(0.1) == 0.0
    assert bucket.try_take(10.0) == 0.0  # refills to burst, no more
    assert bucket.try_take(10.0) == 0.0
    assert bucket.try_take(10.0) > 0


def test_token_bucket_wait_takes_nothing_and_spend_may_go_into_debt() -> None:
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.wait(0.0) == 0.0
    assert bucket.wait(0.0) == 0.0  # looking took nothing
    bucket.spend(0.0)
    bucket.spend(0.0)  # one more than there was: owed
    assert bucket.wait(0.0) == pytest.approx(0.2)
    assert bucket.try_take(0.1) == pytest.approx(0.1)
    assert bucket.try_take(0.2) == 0.0


def test_secret_box_remembers_opened_tokens_and_still_refuses_unknown_keys() -> None:
    from cryptography.fernet import Fernet

    from engine.core.crypto import SecretBox

    key = Fernet.generate_key().decode()
    box = SecretBox((key,))
    sealed = box.seal("whsec_live_" + "s" * 40)
    assert box.open(sealed) == "whsec_live_" + "s" * 40
    assert box.open(sealed) == "whsec_live_" + "s" * 40  # from memory the second time
    other = SecretBox((Fernet.generate_key().decode(),))
    with pytest.raises(ValueError, match="CARGOLINT_SECRET_KEY"):
        other.open(sealed)
