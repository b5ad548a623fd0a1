"""GET /event-types: the supported event types, each with the JSON Schema of its `data`.

The schemas are the ingress schemas in `schemas/` (the ones every message is checked against),
cut down to their `data` part and made self-contained: any `$ref` into the rest of the document
is replaced by what it points to, so a client can validate `data` with the schema alone.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import orjson
from aiohttp import web

from engine.core.events import EVENT_TYPES, SCHEMA_DIR

__all__ = ["DESCRIPTIONS", "data_schema", "event_types", "routes"]

DESCRIPTIONS = {
    "document.uploaded": "A document was uploaded and is being processed.",
    "compliance.warning": "Checking a document found compliance problems, each with a severity.",
    "document.batch_downloaded": "A batch of documents was downloaded as one archive.",
}
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _resolve(node: Any, root: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`node` with every local `$ref` ("#/…") replaced by a copy of its target."""
    if isinstance(node, list):
        return [_resolve(item, root, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        if ref in seen:
            raise ValueError(f"recursive $ref {ref} cannot be inlined")
        target: Any = root
        for part in filter(None, ref[1:].split("/")):
            key = part.replace("~1", "/").replace("~0", "~")
            target = target[int(key)] if isinstance(target, list) else target[key]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        resolved = _resolve(copy.deepcopy(target), root, (*seen, ref))
        return {**resolved, **_resolve(siblings, root, seen)} if siblings else resolved
    return {
        key: _resolve(value, root, seen)
        for key, value in node.items()
        if key not in ("$defs", "definitions")
    }


@functools.cache
def data_schema(event_type: str) -> dict[str, Any]:
    """The self-contained JSON Schema (2020-12) of an event type's `data`."""
    root: dict[str, Any] = orjson.loads(
        (SCHEMA_DIR / f"event.{event_type}.schema.json").read_bytes()
    )
    schema: dict[str, Any] = _resolve(root["properties"]["data"], root)
    return {"$schema": _DIALECT, "title": f"{event_type} data", **schema}


@functools.cache
def _catalogue() -> bytes:
    return orjson.dumps(
        {
            "data": [
                {"name": name, "description": DESCRIPTIONS[name], "schema": data_schema(name)}
                for name in EVENT_TYPES
            ]
        }
    )


async def event_types(_: web.Request) -> web.Response:
    return web.Response(body=_catalogue(), content_type="application/json")


routes = [web.get("/api/v1/event-types", event_types)]
