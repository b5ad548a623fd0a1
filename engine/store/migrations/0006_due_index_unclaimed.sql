-- The poller's index holds only what it may take: pending deliveries no worker claims. Deliveries
-- claimed as they are made (nearly all of them) never enter it, and a worker's held backlog is
-- no longer scanned on every poll. Claims of workers that stopped beating are released to it by
-- `release_lapsed` (engine/store/queue.py).
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (next_attempt_at)
    WHERE status = 'pending' AND claimed_by IS NULL;
