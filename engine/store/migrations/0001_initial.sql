-- Accounts, API keys, webhooks, events, deliveries and their attempts.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    plan        text NOT NULL CHECK (plan IN ('starter', 'business', 'enterprise')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored only as a SHA-256 hash; the prefix helps people tell keys apart.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    mode        text NOT NULL CHECK (mode IN ('test', 'live')),
    key_hash    bytea NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- `secret` is 'plain:<secret>' or 'fernet:<token>' (engine.core.crypto.SecretBox).
-- Deleting a webhook sets deleted_at: its delivery history stays for audit.
CREATE TABLE webhooks (
    id           text PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts (id),
    mode         text NOT NULL CHECK (mode IN ('test', 'live')),
    url          text NOT NULL,
    events       text[] NOT NULL,
    active       boolean NOT NULL DEFAULT true,
    description  text,
    secret       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE INDEX webhooks_by_account ON webhooks (account_id, mode, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;

-- One row per accepted event. `data` is the compact JSON exactly as delivered.
CREATE TABLE events (
    account_id   text NOT NULL,
    id           text NOT NULL,
    mode         text NOT NULL,
    type         text NOT NULL,
    "timestamp"  text NOT NULL,
    data         bytea NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id)
);

-- Delivery ids are derived from (webhook, account, event), so inserting twice is a no-op.
-- claimed_by names the worker holding a pending delivery in memory; a claim by a worker whose
-- heartbeat has lapsed is void, and its due deliveries are claimed by others.
CREATE TABLE deliveries (
    id                text PRIMARY KEY,
    webhook_id        text NOT NULL REFERENCES webhooks (id),
    account_id        text NOT NULL,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    is_test           boolean NOT NULL DEFAULT false,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    response_status   integer,
    response_time_ms  integer,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_attempt_at   timestamptz,
    next_attempt_at   timestamptz,
    claimed_by        text,
    FOREIGN KEY (account_id, event_id) REFERENCES events (account_id, id)
);
-- GET /webhooks/{id}/deliveries: newest first, paged; stays fast with millions of rows.
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, created_at DESC, id DESC);
-- The retry poller's scan: only pending rows, by due time.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE delivery_attempts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id       text NOT NULL REFERENCES deliveries (id),
    number            integer NOT NULL,
    attempted_at      timestamptz NOT NULL,
    response_status   integer,
    response_time_ms  integer,
    error_class       text,
    error             text,
    response_body     text
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, number);

-- Live workers and their heartbeats; a claim is honoured only while its worker beats.
CREATE TABLE workers (
    id            text PRIMARY KEY,
    hostname      text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
