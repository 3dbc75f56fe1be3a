-- mailrelay embedded store, schema version 7: queue_by_state again. Version 6 dropped it for
-- the page every commit wrote to it, on the reasoning that the queue counts read every row
-- either way; they do, but of this index, not of the table: 2,000,000 queued rows are
-- counted in 64 ms with it and in 332 ms without, on the one reader thread that logins and
-- the status API also wait for -- and the queue grows for as long as nothing delivers.

CREATE INDEX queue_by_state ON queue (state);
