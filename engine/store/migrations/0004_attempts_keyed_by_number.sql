-- Attempts are found by (delivery, number), never by a serial id: the identity column cost
-- every attempt a sequence step and an insert into a second btree that nothing reads.
-- delivery_id and number are NOT NULL already, so the key is taken over without a scan.
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_pkey;
ALTER TABLE delivery_attempts DROP COLUMN id;
ALTER TABLE delivery_attempts
    ADD CONSTRAINT delivery_attempts_number PRIMARY KEY USING INDEX delivery_attempts_number;
