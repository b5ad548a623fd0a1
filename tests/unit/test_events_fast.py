"""The fast validator compiled by fastjsonschema agrees with jsonschema on the ingress schemas.

jsonschema words the dead-letter reasons and has the last word; the fast path only decides
cheaply what jsonschema would accept. It must never accept what jsonschema rejects. It may
reject what jsonschema accepts in one known case (a pattern's `$` before a final newline),
and then `parse_event` asks jsonschema and accepts.
"""

from __future__ import annotations

import copy
from typing import Any

import fastjsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core import events, payload

DOCUMENT = {"id": "doc_1", "fileName": "a.pdf", "documentType": "invoice", "status": "new"}
BASE: dict[str, dict[str, Any]] = {
    event_type: {
        "id": "evt_1",
        "event": event_type,
        "accountId": "acct_1",
        "mode": "live",
        "timestamp": "2026-03-02T11:45:00Z",
        "data": payload.sample_data(event_type),
    }
    for event_type in events.EVENT_TYPES
}
_DROP = object()


def fast_ok(message: dict[str, Any]) -> bool:
    try:
        events.fast_validator(message["event"])(message)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def slow_ok(message: dict[str, Any]) -> bool:
    return events._validator(message["event"]).is_valid(message)


def changed(event_type: str, path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    message = copy.deepcopy(BASE[event_type])
    node: Any = message
    for key in path[:-1]:
        node = node[key]
    if value is _DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return message


U, W, B = "document.uploaded", "compliance.warning", "document.batch_downloaded"
TABLE = [
    (U, ("id",), "x"),
    (U, ("id",), ""),
    (U, ("id",), "x" * 255),
    (U, ("id",), "x" * 256),
    (U, ("id",), 7),
    (U, ("id",), _DROP),
    (U, ("mode",), "test"),
    (U, ("mode",), "staging"),
    (U, ("mode",), None),
    (U, ("mode",), _DROP),
    (U, ("accountId",), "é" * 255),
    (U, ("accountId",), "é" * 256),
    (U, ("timestamp",), "2026-03-02t11:45:00.123456+01:00"),
    (U, ("timestamp",), "2026-03-02T11:45:00"),
    (U, ("timestamp",), "x2026-03-02T11:45:00Z"),
    (U, ("timestamp",), "2026-03-02T11:45:00Zx"),
    (U, ("timestamp",), "٢٠٢٦-03-02T11:45:00Z"),  # Arabic-Indic digits: \d in Python re
    (U, ("timestamp",), 1_700_000_000),
    (U, ("data",), []),
    (U, ("data",), {}),
    (U, ("data", "document"), None),
    (U, ("data", "document", "fileName"), "f" * 1024),
    (U, ("data", "document", "fileName"), "f" * 1025),
    (U, ("data", "document", "status"), ""),
    (U, ("data", "document", "extra"), {"any": "thing"}),
    (U, ("extra",), [1, 2, 3]),
    (W, ("data", "warnings"), []),
    (W, ("data", "warnings"), {}),
    (W, ("data", "warnings", 0, "severity"), "critical"),
    (W, ("data", "warnings", 0, "severity"), "high"),
    (W, ("data", "warnings", 0, "code"), _DROP),
    (W, ("data", "warnings", 0), "text"),
    (W, ("data", "document"), _DROP),
    (B, ("data", "batch", "documentCount"), 0),
    (B, ("data", "batch", "documentCount"), -1),
    (B, ("data", "batch", "documentCount"), 2.0),
    (B, ("data", "batch", "documentCount"), 2.5),
    (B, ("data", "batch", "documentCount"), True),
    (B, ("data", "batch", "documentCount"), "2"),
    (B, ("data", "batch", "documentIds"), []),
    (B, ("data", "batch", "documentIds"), ["doc_1", 2]),
    (B, ("data", "batch", "documentIds"), ["doc_1", ""]),
    (B, ("data", "batch", "archiveName"), None),
    (B, ("data", "batch", "id"), _DROP),
]


@pytest.mark.parametrize(("event_type", "path", "value"), TABLE)
def test_fast_path_and_jsonschema_agree(
    event_type: str, path: tuple[str | int, ...], value: object
) -> None:
    message = changed(event_type, path, value)
    assert fast_ok(message) == slow_ok(message)
    accepted = True
    try:
        events.parse_event(orjson.dumps(message))
    except events.InvalidEventError:
        accepted = False
    assert accepted == slow_ok(message)


def test_base_messages_are_valid() -> None:
    for message in BASE.values():
        assert fast_ok(message)
        assert slow_ok(message)


def test_a_final_newline_is_the_one_known_difference_and_jsonschema_decides() -> None:
    message = changed(U, ("timestamp",), "2026-03-02T11:45:00Z\n")
    assert not fast_ok(message)
    assert slow_ok(message)
    assert events.parse_event(orjson.dumps(message)).timestamp == "2026-03-02T11:45:00Z\n"


def test_fast_path_leaves_the_message_alone() -> None:
    message = changed(U, ("mode",), _DROP)
    events.fast_validator(U)(message)
    assert "mode" not in message


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
    | st.sampled_from(["", "test", "live", "low", "high", "2026-03-02T11:45:00Z", "x" * 256]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = []
    keys: list[str | int] = list(node) if isinstance(node, dict) else list(range(len(node)))
    for key in keys:
        path = (*prefix, key)
        found.append(path)
        if isinstance(node[key], dict | list):
            found.extend(_paths(node[key], path))
    return found


PATHS = {t: [p for p in _paths(m) if p != ("event",)] for t, m in BASE.items()}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=st.sampled_from(events.EVENT_TYPES),
    data=st.data(),
)
def test_fast_path_and_jsonschema_agree_on_generated_messages(
    event_type: str, data: st.DataObject
) -> None:
    message = copy.deepcopy(BASE[event_type])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(PATHS[event_type]))
        value = data.draw(st.just(_DROP) | json_values)
        try:
            message = _apply(message, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the parent
    assert fast_ok(message) == slow_ok(message)


def _apply(message: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    node: Any = message
    for key in path[:-1]:
        node = node[key]
    if value is _DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return message
