"""Request validation for the Webhooks API: pure functions that raise ApiError naming the field.

The URL's form is checked here; whether its host resolves to an allowed address is an I/O
question answered in `engine.api.destination`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    "parse_page",
    "parse_update",
]

MAX_DESCRIPTION = 255
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
WEBHOOK_ID = re.compile(r"wh_[a-z0-9]{12,64}")  # use with fullmatch: `$` allows a final newline
_FIELDS = ("url", "events", "active", "description")
DELIVERY_STATUSES = ("pending", "succeeded", "failed")
_INTEGER = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass(frozen=True, slots=True)
class WebhookInput:
    url: str
    events: tuple[str, ...]
    active: bool
    description: str | None


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "request body must be a JSON object")
    for name in body:
        if name not in _FIELDS:
            raise bad_request(
                "unknown_field", f"unknown field {name!r}; allowed: {', '.join(_FIELDS)}", name
            )
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
