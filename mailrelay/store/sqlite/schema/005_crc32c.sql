-- mailrelay embedded store, schema version 5: a body in a segment file gets a CRC-32C
-- (Castagnoli, computed with the CPU's CRC instruction) in body_crc32c, and body_crc stays
-- NULL. Rows from before keep their CRC-32 in body_crc and are checked with it. A row has one
-- of the two when its body is in a segment (body_crc where no fast CRC-32C is available).

ALTER TABLE messages ADD COLUMN body_crc32c INTEGER;
