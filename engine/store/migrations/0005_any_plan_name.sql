-- Any plan name may be given: webhooks are for business and enterprise accounts only (the API
-- answers 403 plan_required to every other plan), and an operator creates the accounts of the
-- other plans under whatever names they have. Names are lowercase identifiers.
ALTER TABLE accounts DROP CONSTRAINT accounts_plan_check;
ALTER TABLE accounts
    ADD CONSTRAINT accounts_plan_check CHECK (plan ~ '^[a-z][a-z0-9_-]{0,63}$');
