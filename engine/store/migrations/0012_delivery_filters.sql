-- GET /webhooks/{id}/deliveries?status=…&event=…: a filtered page is read in index order, newest
-- first, without a sort, however many deliveries the webhook has. With both filters the page is
-- read from one of them and filtered on the other column.
-- Built inside the migration's transaction (not CONCURRENTLY): writes to deliveries wait while
-- each index is built, a few seconds per million rows.
CREATE INDEX deliveries_by_status ON deliveries (webhook_id, status, created_at DESC, id DESC);
CREATE INDEX deliveries_by_event ON deliveries (webhook_id, event_type, created_at DESC, id DESC);
