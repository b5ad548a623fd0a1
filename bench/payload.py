"""The benchmark's events: `document.uploaded` messages whose webhook body is about 1 KiB.

The publish time travels in `data.document.fileName` as `t=<unix seconds>;<padding>.pdf`, a
field every schema version keeps, so the receiver can measure publish-to-receive latency.
"""

from __future__ import annotations

import time

import orjson

from engine.core.payload import build_body

__all__ = [
    "BODY_BYTES",
    "EVENT_TYPE",
    "SECRET",
    "TIMESTAMP",
    "delivery_body",
    "event_data",
    "event_message",
]

BODY_BYTES = 1024
EVENT_TYPE = "document.uploaded"
TIMESTAMP = "2026-03-02T11:45:00Z"
# One signing secret for every benchmark webhook, so the receiver can check each signature.
SECRET = "whsec_live_" + "b" * 32
_SAMPLE_IDS = ("wh_bench000000000000", "dlv_" + "0" * 24)


def event_data(document_id: str, sent_at: float, pad: int) -> dict[str, object]:
    file_name = f"t={sent_at:.6f};" + "x" * pad + ".pdf"
    return {
        "document": {
            "id": document_id,
            "fileName": file_name,
            "documentType": "invoice",
            "status": "processing",
        }
    }


def _padding() -> int:
    """How much filler makes the delivered body BODY_BYTES long."""
    data = orjson.dumps(event_data("doc_000000000000", time.time(), 0))
    body = build_body(
        event_type=EVENT_TYPE,
        timestamp=TIMESTAMP,
        webhook_id=_SAMPLE_IDS[0],
        delivery_id=_SAMPLE_IDS[1],
        data=data,
    )
    return max(0, BODY_BYTES - len(body))


PAD = _padding()


def event_message(event_id: str, account_id: str, sent_at: float | None = None) -> bytes:
    """An ingress message (docs/contract.md §2) stamped with its publish time."""
    stamp = time.time() if sent_at is None else sent_at
    return orjson.dumps(
        {
            "id": event_id,
            "event": EVENT_TYPE,
            "accountId": account_id,
            "mode": "live",
            "timestamp": TIMESTAMP,
            "data": event_data(f"doc_{event_id}", stamp, PAD),
        }
    )


def delivery_body(webhook_id: str, delivery_id: str, sent_at: float) -> bytes:
    """The webhook body the engine would send for one of our events (for the limit client)."""
    return build_body(
        event_type=EVENT_TYPE,
        timestamp=TIMESTAMP,
        webhook_id=webhook_id,
        delivery_id=delivery_id,
        data=orjson.dumps(event_data(f"doc_{delivery_id}", sent_at, PAD)),
    )
