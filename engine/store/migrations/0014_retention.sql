-- Retention (engine/store/retention.py): the purge reads the oldest finished deliveries first,
-- a few thousand at a time, from this index. Pending deliveries are never in it (they are never
-- removed), so an insert adds no entry: only the update that ends a delivery does, and that
-- update already writes a new entry into every index of the table (it changes indexed columns,
-- so it is never a HOT update).
-- Key and predicate are spelt so that no query but the purge's can use the index: on created_at
-- itself, or with the predicate `status IN (…)` that `status = 'failed'` implies, the planner
-- read a webhook's filtered delivery list through it (every finished delivery in time order,
-- filtered by webhook, then sorted), misled by the missing statistics on status (0009) into
-- taking the index for a small one. The delivery list's plan test guards this.
-- Built inside the migration's transaction: writes to deliveries wait while it is built
-- (measured in docs/retention.md).
CREATE INDEX deliveries_finished ON deliveries ((created_at AT TIME ZONE 'UTC'))
    WHERE (status IN ('succeeded', 'failed')) IS TRUE;
