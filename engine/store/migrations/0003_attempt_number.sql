-- One row per (delivery, attempt number): a batch of attempt records written again after its
-- commit went through but the acknowledgement was lost (ON CONFLICT DO NOTHING) adds nothing.
-- Duplicates could exist from before; keep the first row written of each.
DELETE FROM delivery_attempts a
USING delivery_attempts b
WHERE a.delivery_id = b.delivery_id AND a.number = b.number AND a.id > b.id;

-- Unique, and it serves the reads by delivery that delivery_attempts_by_delivery served.
CREATE UNIQUE INDEX delivery_attempts_number ON delivery_attempts (delivery_id, number);
DROP INDEX delivery_attempts_by_delivery;
