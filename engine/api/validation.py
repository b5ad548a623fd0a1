"""Request validation for the Webhooks API: pure functions that raise ApiError naming the field.

The URL's form is checked here; whether its host resolves to an allowed address is an I/O
question answered in `engine.api.destination`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from multidict import MultiMapping

from engine.api.errors import ApiError, bad_request
from engine.core.events import EVENT_TYPES
from engine.core.urls import UrlError, check_url
from engine.store.deliveries import DeliveryFilter

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_DESCRIPTION",
    "MAX_LIMIT",
    "WEBHOOK_ID",
    "WebhookInput",
    "parse_create",
    "parse_delivery_filter",
    "parse_empty",
    "parse_page",
    "parse_recover",
    "parse_rotation",
    "parse_update",
]

MAX_DESCRIPTION = 255
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
WEBHOOK_ID = re.compile(r"wh_[a-z0-9]{12,64}")  # use with fullmatch: `$` allows a final newline
_FIELDS = ("url", "events", "active", "description")
DELIVERY_STATUSES = ("pending", "succeeded", "failed")
DEFAULT_OVERLAP = 86_400
MAX_OVERLAP = 604_800  # a week
# RFC 3339's date-time: a full date, `T`, a time and an offset (`Z` or ±hh:mm).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)
_INTEGER = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass(frozen=True, slots=True)
class WebhookInput:
    url: str
    events: tuple[str, ...]
    active: bool
    description: str | None


def _object(body: Any, allowed: tuple[str, ...] = _FIELDS) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "request body must be a JSON object")
    for name in body:
        if name not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "this request takes none"
            raise bad_request("unknown_field", f"unknown field {name[:100]!r}; {hint}", name)
    return body


def _url(value: Any, *, allow_http: bool) -> str:
    if not isinstance(value, str):
        raise bad_request("invalid_type", "url must be a string", "url")
    try:
        return check_url(value, allow_http=allow_http)
    except UrlError as exc:
        raise bad_request(exc.code, str(exc), "url") from None


def _events(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise bad_request("invalid_type", "events must be an array of strings", "events")
    if not value:
        raise bad_request("invalid_events", "events must list at least one event type", "events")
    for event in value:
        if event not in EVENT_TYPES:
            raise bad_request(
                "unknown_event_type",
                f"event type {event[:100]!r} is not supported; supported: {', '.join(EVENT_TYPES)}",
                "events",
            )
    if len(set(value)) != len(value):
        raise bad_request("invalid_events", "events must not repeat an event type", "events")
    return tuple(value)


def _active(value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_request("invalid_type", "active must be true or false", "active")
    return value


def _description(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request("invalid_type", "description must be a string or null", "description")
    if len(value) > MAX_DESCRIPTION:
        raise bad_request(
            "invalid_value",
            f"description must be at most {MAX_DESCRIPTION} characters",
            "description",
        )
    if "\x00" in value:  # Postgres text cannot hold NUL
        raise bad_request(
            "invalid_value", "description must not contain NUL characters", "description"
        )
    return value


def parse_create(body: Any, *, allow_http: bool) -> WebhookInput:
    """A create request's fields, or ApiError(400) naming the first field at fault."""
    fields = _object(body)
    for required in ("url", "events"):
        if required not in fields:
            raise bad_request("missing_field", f"{required} is required", required)
    return WebhookInput(
        url=_url(fields["url"], allow_http=allow_http),
        events=_events(fields["events"]),
        active=_active(fields.get("active", True)),
        description=_description(fields.get("description")),
    )


def parse_update(body: Any, *, allow_http: bool) -> dict[str, Any]:
    """The fields a PUT changes. `null` clears description; it is refused for the others."""
    fields = _object(body)
    for name in ("url", "events", "active"):
        if name in fields and fields[name] is None:
            raise bad_request("invalid_type", f"{name} cannot be null", name)
    changes: dict[str, Any] = {}
    if "url" in fields:
        changes["url"] = _url(fields["url"], allow_http=allow_http)
    if "events" in fields:
        changes["events"] = _events(fields["events"])
    if "active" in fields:
        changes["active"] = _active(fields["active"])
    if "description" in fields:
        changes["description"] = _description(fields["description"])
    return changes


def _page_param(query: MultiMapping[str], name: str, default: int, low: int, high: int) -> int:
    values = query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise ApiError(400, "invalid_pagination", f"{name} must be given at most once", name)
    raw = values[0]
    if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(
            400,
            "invalid_pagination",
            f"{name} must be an integer from {low} to {high}, got {raw[:40]!r}",
            name,
        )
    return int(raw)


def parse_page(query: MultiMapping[str]) -> tuple[int, int]:
    """(offset, limit) from the query string: offset >= 0 (default 0), limit 1-100 (20)."""
    offset = _page_param(query, "offset", 0, 0, 10**9 - 1)
    limit = _page_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    return offset, limit


def _choice(query: MultiMapping[str], name: str, allowed: tuple[str, ...]) -> str | None:
    values = query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise bad_request("invalid_value", f"{name} must be given at most once", name)
    if values[0] not in allowed:
        raise bad_request(
            "invalid_value",
            f"{name} must be one of {', '.join(allowed)}, got {values[0][:40]!r}",
            name,
        )
    return values[0]


def parse_delivery_filter(query: MultiMapping[str]) -> DeliveryFilter:
    """The `status` and `event` filters of a delivery list; each at most once, from its set."""
    return DeliveryFilter(
        status=_choice(query, "status", DELIVERY_STATUSES),
        event_type=_choice(query, "event", EVENT_TYPES),
    )


def parse_empty(body: Any) -> None:
    """A body that must say nothing: {} (or none at all); any field is unknown."""
    _object(body, ())


def parse_rotation(body: Any) -> int:
    """The overlap of a secret rotation in seconds: `overlapSeconds`, 0 to a week (a day)."""
    fields = _object(body, ("overlapSeconds",))
    value = fields.get("overlapSeconds", DEFAULT_OVERLAP)
    # JSON has one number type: 60.0 is the integer 60 (as JSON Schema's "integer" says), 60.5
    # is not; true is not a number at all.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(
            "invalid_type", "overlapSeconds must be an integer number of seconds", "overlapSeconds"
        )
    if not 0 <= value <= MAX_OVERLAP:
        raise bad_request(
            "invalid_value",
            f"overlapSeconds must be from 0 to {MAX_OVERLAP} (a week), got {value}",
            "overlapSeconds",
        )
    return value


def _instant(fields: Mapping[str, Any], name: str) -> datetime | None:
    if name not in fields:
        return None
    value = fields[name]
    if not isinstance(value, str):
        raise bad_request("invalid_type", f"{name} must be an RFC 3339 date-time string", name)
    problem = f"{name} must be an RFC 3339 date-time such as 2026-12-01T00:00:00Z"
    if not _RFC3339.fullmatch(value):
        raise bad_request("invalid_value", f"{problem}, got {value[:40]!r}", name)
    try:
        return datetime.fromisoformat(value.upper()).astimezone(UTC)
    # Well formed but no such instant (2026-02-30, 25:00), or out of range in UTC (year 10000).
    except (ValueError, OverflowError):
        raise bad_request("invalid_value", f"{problem}, got {value[:40]!r}", name) from None


def parse_recover(body: Any, now: datetime) -> tuple[datetime, datetime | None]:
    """(since, until) of a recover request; until is None when not given (now, then)."""
    fields = _object(body, ("since", "until"))
    since = _instant(fields, "since")
    if since is None:
        raise bad_request("missing_field", "since is required", "since")
    until = _instant(fields, "until")
    if since > (now if until is None else until):
        end = "until" if until is not None else "now"
        raise bad_request("invalid_value", f"since must not be after {end}", "since")
    return since, until
