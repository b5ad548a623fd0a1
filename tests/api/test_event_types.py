"""GET /event-types: the three supported types, each with a self-contained schema of its data."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest

from engine.api.catalogue import data_schema
from engine.core.events import EVENT_TYPES, parse_event
from tests.api.conftest import Client
from tests.worker.helpers import event_data, make_event


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_the_catalogue_lists_the_three_types(client: Client) -> None:
    status, body, _ = await client.call("GET", "/api/v1/event-types")
    assert status == 200
    assert set(body) == {"data"}
    assert [t["name"] for t in body["data"]] == [
        "document.uploaded",
        "compliance.warning",
        "document.batch_downloaded",
    ]
    for entry in body["data"]:
        assert set(entry) == {"name", "description", "schema"}
        assert entry["description"]
        assert entry["schema"] == data_schema(entry["name"])
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        assert _refs(entry["schema"]) == []


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_schema_accepts_the_data_ingress_accepts(event_type: str) -> None:
    validator = jsonschema.Draft202012Validator(data_schema(event_type))
    data = event_data(event_type)
    assert validator.is_valid(data)
    # The same data passes ingress, which checks whole messages against schemas/.
    parse_event(orjson.dumps(make_event("acct_1", event_type) | {"data": data}))


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("document.uploaded", {}),
        ("document.uploaded", {"document": {"id": "doc_1"}}),
        ("compliance.warning", {"document": event_data("document.uploaded")["document"]}),
        (
            "compliance.warning",
            event_data("compliance.warning")
            | {"warnings": [{"code": "x", "message": "y", "severity": "fatal"}]},
        ),
        ("document.batch_downloaded", {"batch": {"id": "b"}}),
        ("document.batch_downloaded", []),
    ],
)
def test_each_schema_rejects_what_ingress_rejects(event_type: str, data: Any) -> None:
    assert not jsonschema.Draft202012Validator(data_schema(event_type)).is_valid(data)


def test_references_into_the_rest_of_a_document_are_inlined() -> None:
    from engine.api.catalogue import _resolve

    root: dict[str, Any] = {
        "$defs": {"doc": {"type": "object", "properties": {"id": {"$ref": "#/$defs/id"}}},
                  "id": {"type": "string", "minLength": 1}},
        "properties": {"data": {"properties": {"document": {"$ref": "#/$defs/doc",
                                                            "description": "d"}}}},
    }  # fmt: skip
    resolved = _resolve(root["properties"]["data"], root)
    assert resolved == {
        "properties": {
            "document": {
                "type": "object",
                "properties": {"id": {"type": "string", "minLength": 1}},
                "description": "d",
            }
        }
    }
