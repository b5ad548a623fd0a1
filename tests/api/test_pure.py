"""Table tests for the API's pure parts: request validation, pagination, per-key rate limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from multidict import MultiDict

from engine.api.errors import ApiError
from engine.api.limits import KeyRateLimiter
from engine.api.validation import WEBHOOK_ID, WebhookInput, parse_create, parse_page, parse_update
from engine.store.webhooks import webhook_json

URL = "https://example.com/hook"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"url": URL, "events": ["document.uploaded"]},
            WebhookInput(URL, ("document.uploaded",), True, None),
        ),
        (
            {
                "url": URL,
                "events": ["compliance.warning", "document.batch_downloaded"],
                "active": False,
                "description": "",
            },
            WebhookInput(URL, ("compliance.warning", "document.batch_downloaded"), False, ""),
        ),
        (
            {"url": URL, "events": ["document.uploaded"], "description": None},
            WebhookInput(URL, ("document.uploaded",), True, None),
        ),
    ],
)
def test_parse_create_accepts(body: dict[str, Any], expected: WebhookInput) -> None:
    assert parse_create(body, allow_http=False) == expected


@pytest.mark.parametrize(
    ("body", "allow_http", "code", "field"),
    [
        (None, False, "invalid_body", None),
        ([{"url": URL}], False, "invalid_body", None),
        ({}, False, "missing_field", "url"),
        ({"url": URL}, False, "missing_field", "events"),
        ({"url": URL, "events": ["document.uploaded"], "x": 1}, False, "unknown_field", "x"),
        ({"url": ["x"], "events": ["document.uploaded"]}, False, "invalid_type", "url"),
        ({"url": "http://example.com/", "events": ["document.uploaded"]}, False,
         "invalid_url", "url"),
        ({"url": URL, "events": {}}, False, "invalid_type", "events"),
        ({"url": URL, "events": [None]}, False, "invalid_type", "events"),
        ({"url": URL, "events": []}, False, "invalid_events", "events"),
        ({"url": URL, "events": ["Document.Uploaded"]}, False, "unknown_event_type", "events"),
        ({"url": URL, "events": ["document.uploaded"] * 2}, False, "invalid_events", "events"),
        ({"url": URL, "events": ["document.uploaded"], "active": 0}, False,
         "invalid_type", "active"),
        ({"url": URL, "events": ["document.uploaded"], "description": "é" * 256}, False,
         "invalid_value", "description"),
        ({"url": URL, "events": ["document.uploaded"], "description": ["a"]}, False,
         "invalid_type", "description"),
    ],
)  # fmt: skip
def test_parse_create_refuses(body: Any, allow_http: bool, code: str, field: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        parse_create(body, allow_http=allow_http)
    assert (caught.value.status, caught.value.code, caught.value.field) == (400, code, field)


def test_parse_create_http_when_allowed() -> None:
    spec = parse_create({"url": "http://example.com/", "events": ["document.uploaded"]},
                        allow_http=True)  # fmt: skip
    assert spec.url == "http://example.com/"


@pytest.mark.parametrize(
    ("body", "changes"),
    [
        ({}, {}),
        ({"active": False}, {"active": False}),
        ({"description": None}, {"description": None}),
        ({"events": ["document.uploaded"]}, {"events": ("document.uploaded",)}),
        ({"url": URL, "description": "d"}, {"url": URL, "description": "d"}),
    ],
)
def test_parse_update_accepts(body: dict[str, Any], changes: dict[str, Any]) -> None:
    assert parse_update(body, allow_http=False) == changes


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"url": None}, "invalid_type", "url"),
        ({"events": None}, "invalid_type", "events"),
        ({"active": None}, "invalid_type", "active"),
        ({"id": "wh_x"}, "unknown_field", "id"),
        ({"secret": "s"}, "unknown_field", "secret"),
        ({"createdAt": "2026-01-01T00:00:00Z"}, "unknown_field", "createdAt"),
        ("x", "invalid_body", None),
    ],
)
def test_parse_update_refuses(body: Any, code: str, field: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        parse_update(body, allow_http=False)
    assert (caught.value.code, caught.value.field) == (code, field)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ([], (0, 20)),
        ([("offset", "0"), ("limit", "1")], (0, 1)),
        ([("limit", "100")], (0, 100)),
        ([("offset", "999999999")], (999999999, 20)),
        ([("other", "x")], (0, 20)),
    ],
)
def test_parse_page_accepts(query: list[tuple[str, str]], expected: tuple[int, int]) -> None:
    assert parse_page(MultiDict(query)) == expected


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ([("limit", "0")], "limit"),
        ([("limit", "101")], "limit"),
        ([("limit", "-1")], "limit"),
        ([("limit", "abc")], "limit"),
        ([("limit", " 5")], "limit"),
        ([("limit", "+5")], "limit"),
        ([("limit", "\uff15")], "limit"),  # a full-width 5: int() would take it
        ([("limit", "5\n")], "limit"),
        ([("limit", "5"), ("limit", "6")], "limit"),
        ([("offset", "-1")], "offset"),
        ([("offset", "1e3")], "offset"),
        ([("offset", "1000000000")], "offset"),
    ],
)
def test_parse_page_refuses(query: list[tuple[str, str]], field: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_page(MultiDict(query))
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        400,
        "invalid_pagination",
        field,
    )


def test_a_repeated_page_parameter_is_named_as_repeated() -> None:
    # limit=20&limit=30: each value is fine, so the message must not blame the first one.
    with pytest.raises(ApiError) as caught:
        parse_page(MultiDict([("limit", "20"), ("limit", "30")]))
    assert caught.value.field == "limit"
    assert caught.value.message == "limit must be given at most once"


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("wh_abcdefghijkl", True),
        ("wh_0123456789ab0123", True),
        ("wh_abcdefghijk", False),
        ("wh_ABCDEFGHIJKL", False),
        ("wh_abcdefghijkl\n", False),
        (" wh_abcdefghijkl", False),
        ("dlv_abcdefghijkl", False),
        ("wh_" + "a" * 65, False),
    ],
)
def test_webhook_id_pattern(value: str, matches: bool) -> None:
    assert bool(WEBHOOK_ID.fullmatch(value)) is matches


def test_rate_limiter_per_key_with_time_passed_in() -> None:
    limiter = KeyRateLimiter(rate=2.0, burst=2)
    assert limiter.wait("key_a", 100.0) == 0.0
    assert limiter.wait("key_a", 100.0) == 0.0
    assert limiter.wait("key_a", 100.0) == pytest.approx(0.5)
    assert limiter.wait("key_b", 100.0) == 0.0  # another key has its own bucket
    assert limiter.wait("key_a", 100.5) == 0.0  # half a second refills one token
    assert limiter.wait("key_a", 100.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("stamp", "text"),
    [
        (datetime(2026, 3, 2, 11, 45, 0, tzinfo=UTC), "2026-03-02T11:45:00.000Z"),
        (datetime(2026, 3, 2, 11, 45, 0, 123999, tzinfo=UTC), "2026-03-02T11:45:00.123Z"),
        (
            datetime(2026, 3, 2, 13, 45, 0, tzinfo=timezone(timedelta(hours=2))),
            "2026-03-02T11:45:00.000Z",
        ),
    ],
)
def test_webhook_json_timestamps_are_utc_z(stamp: datetime, text: str) -> None:
    row = {
        "id": "wh_abcdefghijkl",
        "url": URL,
        "events": ["document.uploaded"],
        "active": True,
        "description": None,
        "created_at": stamp,
        "updated_at": stamp,
        "previous_secret_expires_at": stamp,
        "disabled_reason": "gone",
        "disabled_at": stamp,
    }
    body = webhook_json(row)  # type: ignore[arg-type]
    assert body["createdAt"] == body["updatedAt"] == text
    assert body["previousSecretExpiresAt"] == body["disabledAt"] == text
    assert body["disabledReason"] == "gone"
    assert "secret" not in body
    assert webhook_json(row, secret="whsec_test_x")["secret"] == "whsec_test_x"  # type: ignore[arg-type]
