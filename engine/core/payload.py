"""The webhook request body (docs/contract.md §3) and the sample data of test deliveries."""

from __future__ import annotations

from typing import Any

import orjson

from engine.core.ids import random_token

__all__ = ["build_body", "sample_data"]


def build_body(
    *,
    event_type: str,
    timestamp: str,
    webhook_id: str,
    delivery_id: str,
    data: bytes,
    test: bool = False,
) -> bytes:
    """The exact bytes POSTed to the receiver: compact UTF-8 JSON.

    `data` is the event's already-compact JSON; it is spliced in rather than re-encoded, which
    keeps the hot path to one small `orjson.dumps`.
    """
    head: dict[str, Any] = {
        "event": event_type,
        "timestamp": timestamp,
        "webhookId": webhook_id,
        "deliveryId": delivery_id,
    }
    if test:
        head["test"] = True
    return orjson.dumps(head)[:-1] + b',"data":' + data + b"}"


def sample_data(event_type: str) -> dict[str, Any]:
    """Realistic sample data for a test delivery; ids start with `doc_test_`/`batch_test_`."""
    document = {
        "id": f"doc_test_{random_token(12)}",
        "fileName": "sample-invoice.pdf",
        "documentType": "invoice",
        "status": "processing",
    }
    if event_type == "document.uploaded":
        return {"document": document}
    if event_type == "compliance.warning":
        return {
            "document": document,
            "warnings": [
                {
                    "code": "missing_hs_code",
                    "message": "Line 3 has no HS code",
                    "severity": "medium",
                }
            ],
        }
    if event_type == "document.batch_downloaded":
        ids = [f"doc_test_{random_token(12)}" for _ in range(2)]
        return {
            "batch": {
                "id": f"batch_test_{random_token(12)}",
                "documentIds": ids,
                "documentCount": len(ids),
                "archiveName": "sample-batch.zip",
            }
        }
    raise ValueError(f"no sample data for event type {event_type!r}")
