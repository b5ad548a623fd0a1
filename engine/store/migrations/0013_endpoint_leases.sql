-- Per-endpoint limits for the whole deployment (docs/fleet-limits.md): each endpoint (scheme +
-- host + port) is sent to by one worker at a time, the holder of its lease, and each pending
-- delivery names its endpoint so that worker claims exactly that endpoint's due deliveries.

-- The endpoint of a URL, as engine.worker.admission.endpoint_key computes it (for the rows
-- written before this column existed, and any written without it).
CREATE FUNCTION cargolint_endpoint(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT lower(m[1]) || '://' || lower(btrim(m[2], '[]')) || ':'
           || coalesce(nullif(m[3], '')::int::text,
                       CASE lower(m[1]) WHEN 'https' THEN '443' WHEN 'http' THEN '80'
                                        ELSE '0' END)
    FROM regexp_match(url, '^([^:/?#]+)://(?:[^@/?#]*@)?(\[[^]]*\]|[^:/?#]*)(?::([0-9]*))?')
         AS m
$$;

-- Set when a delivery is created (from its webhook's URL at the time) and whenever a worker
-- finds that the URL moved to another endpoint. Only pending deliveries need it.
ALTER TABLE deliveries ADD COLUMN endpoint text;
UPDATE deliveries d SET endpoint = cargolint_endpoint(w.url)
FROM webhooks w
WHERE w.id = d.webhook_id AND d.status = 'pending';

-- "Due, unclaimed, for endpoint E, oldest first" (the owner's claims) and "which endpoints have
-- unclaimed work, and since when" (a skip scan, one descent per endpoint, however deep the
-- backlog behind each).
CREATE INDEX deliveries_unclaimed_by_endpoint ON deliveries (endpoint, next_attempt_at)
    WHERE status = 'pending' AND claimed_by IS NULL;
-- Pending deliveries written without an endpoint (normally none): the heartbeat fills it in.
CREATE INDEX deliveries_without_endpoint ON deliveries (id)
    WHERE status = 'pending' AND endpoint IS NULL;

-- Who sends to an endpoint. A lease counts while its worker's heartbeat is fresh (as claims
-- do); `released_at` is set when its worker gave it up, so the next owner knows whether the
-- endpoint has been quiet long enough to start with a full token bucket.
CREATE TABLE endpoint_leases (
    endpoint     text PRIMARY KEY,
    worker_id    text,
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    released_at  timestamptz
);
CREATE INDEX endpoint_leases_by_worker ON endpoint_leases (worker_id);
