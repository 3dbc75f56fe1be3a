-- mailrelay embedded store, schema version 9: prepaid SMS credits per account (SPEC §8.3).
-- NULL: the account has no prepaid limit. A message to phone numbers takes one credit per
-- segment per recipient in the transaction that stores it (see _EnqueueCharged).
ALTER TABLE accounts ADD COLUMN sms_credits INTEGER;
