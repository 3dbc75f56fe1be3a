-- mailrelay embedded store, schema version 6: two indexes that every enqueue paid for and no
-- query needed are dropped, so that a commit writes fewer pages to the WAL.
-- queue_by_state: the queue counts read every row of the queue either way (GROUP BY state),
-- and expiry asks for every state. notifications_by_account_time: the daily quota reads
-- daily_counts; a count since any other moment reads notifications_by_time instead, which
-- expiry needs.

DROP INDEX queue_by_state;
DROP INDEX notifications_by_account_time;
