-- A resent or recovered delivery starts a fresh retry schedule while `attempts` keeps counting:
-- retry_base is the number of attempts made before the current schedule began, so the backoff
-- step and the attempts left are counted from `attempts - retry_base`.
ALTER TABLE deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
