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

-- How many deliveries each webhook has per hour (UTC), status and event type, so that a page
-- deep in a long delivery list is found without counting every delivery before it
-- (engine/store/delivery_counts.py). A webhook's hours before its `counted_until` are counted:
-- the worker counts each hour once it is over an hour old, and from then on every change that
-- touches a counted hour is added to delivery_count_changes — by the triggers below for a status
-- changed later (a late retry, a resend, a disabled webhook) or a delivery dated back, by the
-- purge for what it removes — and folded into delivery_counts by the worker.
CREATE TABLE delivery_counts (
    webhook_id  text NOT NULL,
    hour        timestamptz NOT NULL,
    status      text NOT NULL,
    event_type  text NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (webhook_id, hour, status, event_type)
);
CREATE TABLE delivery_counts_state (
    webhook_id     text PRIMARY KEY,
    counted_until  timestamptz NOT NULL
);
-- Insert-only, so that writers adding to the same hour never wait on or deadlock each other.
CREATE TABLE delivery_count_changes (
    webhook_id  text NOT NULL,
    hour        timestamptz NOT NULL,
    status      text NOT NULL,
    event_type  text NOT NULL,
    n           integer NOT NULL
);
CREATE INDEX delivery_count_changes_by_webhook ON delivery_count_changes (webhook_id);

-- FOR SHARE on the webhook's state row: while the worker counts the webhook's hours (it holds
-- that row locked), a change waits, and then is either in the count or added to it, never both.
CREATE FUNCTION delivery_counts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counted timestamptz;
BEGIN
    SELECT s.counted_until INTO counted FROM delivery_counts_state s
        WHERE s.webhook_id = NEW.webhook_id FOR SHARE;
    IF counted IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.created_at < counted THEN
        INSERT INTO delivery_count_changes
        VALUES (OLD.webhook_id, date_trunc('hour', OLD.created_at, 'UTC'), OLD.status,
                OLD.event_type, -1);
    END IF;
    IF NEW.created_at < counted THEN
        INSERT INTO delivery_count_changes
        VALUES (NEW.webhook_id, date_trunc('hour', NEW.created_at, 'UTC'), NEW.status,
                NEW.event_type, 1);
    END IF;
    RETURN NULL;
END
$$;
-- Only rows over an hour old can be in a counted hour (the worker counts hours that ended more
-- than an hour and five minutes ago), so the hot path's writes — inserts dated now, the ends of
-- fresh deliveries — pass these conditions and never call the function.
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON deliveries
    FOR EACH ROW WHEN (NEW.created_at < now() - interval '1 hour')
    EXECUTE FUNCTION delivery_counts_follow();
CREATE TRIGGER delivery_counts_update AFTER UPDATE OF status, created_at ON deliveries
    FOR EACH ROW WHEN ((OLD.status IS DISTINCT FROM NEW.status
                        OR OLD.created_at IS DISTINCT FROM NEW.created_at)
                       AND LEAST(OLD.created_at, NEW.created_at) < now() - interval '1 hour')
    EXECUTE FUNCTION delivery_counts_follow();
