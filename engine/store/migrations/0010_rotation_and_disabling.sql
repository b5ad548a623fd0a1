-- Secret rotation with an overlap, and webhooks disabled by the engine.
--
-- previous_secret is sealed like `secret` ('plain:…' or 'fernet:…'). While
-- previous_secret_expires_at is in the future, X-CargoLint-Signature is computed with the
-- previous secret and X-CargoLint-Signature-Next with `secret`; afterwards only `secret` signs.
-- Every worker compares the expiry with its own clock at each attempt, so the overlap ends on
-- time without a reload.
ALTER TABLE webhooks ADD COLUMN previous_secret text;
ALTER TABLE webhooks ADD COLUMN previous_secret_expires_at timestamptz;

-- disabled_reason: 'failing' (every attempt failed for CARGOLINT_DISABLE_AFTER) or 'gone'
-- (a receiver answered 410). failing_since: the first failed attempt after the last success
-- (null while the last attempt succeeded, or before any attempt); test deliveries never touch it.
ALTER TABLE webhooks ADD COLUMN disabled_reason text
    CHECK (disabled_reason IN ('failing', 'gone'));
ALTER TABLE webhooks ADD COLUMN disabled_at timestamptz;
ALTER TABLE webhooks ADD COLUMN failing_since timestamptz;
