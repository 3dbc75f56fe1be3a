-- mailrelay embedded store, schema version 3: large message bodies live in segment files beside
-- the database (mailrelay/store/sqlite/bodies.py). Their row has an empty body and says where
-- the body is and what its CRC-32 is; a row with body_segment NULL has its body inline.

ALTER TABLE messages ADD COLUMN body_segment INTEGER;
ALTER TABLE messages ADD COLUMN body_offset INTEGER;
ALTER TABLE messages ADD COLUMN body_length INTEGER;
ALTER TABLE messages ADD COLUMN body_crc INTEGER;

-- Which segments are still referred to, for deleting the others.
CREATE INDEX messages_by_segment ON messages (body_segment) WHERE body_segment IS NOT NULL;
