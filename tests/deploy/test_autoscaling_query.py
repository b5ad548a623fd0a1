"""KEDA's due-deliveries trigger runs its query against the real schema: it counts due,
unclaimed pending deliveries, at most 500 per endpoint, and nothing else."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from tests.worker.helpers import insert_pending

SCALED_OBJECT = Path(__file__).parents[2] / "deploy/components/keda/scaledobject.yaml"


def _query() -> str:
    docs = list(yaml.safe_load_all(SCALED_OBJECT.read_text()))
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "postgresql"]
    auth = next(
        d
        for d in docs
        if d["kind"] == "TriggerAuthentication"
        and d["metadata"]["name"] == trigger["authenticationRef"]["name"]
    )
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["key"]) == ("connection", "CARGOLINT_DATABASE_URL")
    query: str = trigger["metadata"]["query"]
    return query


async def test_the_trigger_counts_due_unclaimed_work_at_most_500_per_endpoint(
    pool: asyncpg.Pool[Any],
) -> None:
    before = await pool.fetchval(_query())
    tag = secrets.token_hex(4)
    rows = (
        ("deep", 2000, timedelta(0), None),  # counts 500: one worker sends to it, however deep
        ("small", 7, timedelta(0), None),  # counts 7
        ("later", 50, timedelta(hours=1), None),  # not due
        ("held", 30, timedelta(0), "wrk_someone"),  # claimed: a worker has it in hand
    )
    for name, count, due_in, claimed_by in rows:
        prefix = f"dlv_keda_{name}_{tag}_"
        await insert_pending(
            pool,
            prefix,
            count,
            webhook_id="wh_keda",
            account_id="acct_keda",
            due_in=due_in,
            claimed_by=claimed_by,
        )
        await pool.execute(
            "UPDATE deliveries SET endpoint = $2 WHERE id LIKE $1 || '%'",
            prefix,
            f"https://{name}-{tag}.example:443",
        )
    try:
        assert await pool.fetchval(_query()) - before == 500 + 7
    finally:
        await pool.execute(
            "UPDATE deliveries SET status = 'failed' WHERE id LIKE 'dlv_keda_%' || $1 || '%'", tag
        )
