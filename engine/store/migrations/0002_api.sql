-- Deleting or deactivating a webhook ends its pending deliveries; this finds them without
-- walking the webhook's whole delivery history.
CREATE INDEX deliveries_pending_by_webhook ON deliveries (webhook_id) WHERE status = 'pending';
