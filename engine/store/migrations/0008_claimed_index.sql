-- The heartbeat's scans of claims — `own_stale` (this worker's) and `release_lapsed` (everyone
-- else's) — read only the claimed pending deliveries, at most what the workers hold in memory,
-- instead of every pending one. With a dead endpoint's backlog of a million retries waiting they
-- were sequential scans of 120–530 ms of Postgres each, on every beat of every worker.
-- A claim made by the insert or by `claim_due` adds an entry; the update that ends or releases
-- the delivery leaves it dead, for the next vacuum.
CREATE INDEX deliveries_claimed ON deliveries (claimed_by)
    WHERE status = 'pending' AND claimed_by IS NOT NULL;
