-- mailrelay embedded store, schema version 2: how many notifications each account had
-- accepted per UTC day, kept up to date by every enqueue, so that the daily quota is one row
-- read per file instead of a count of every message of the day (which grew with the day).

CREATE TABLE daily_counts (
    account  TEXT NOT NULL,
    day      INTEGER NOT NULL,   -- UTC days since the POSIX epoch (received_at / 86400000)
    accepted INTEGER NOT NULL,
    PRIMARY KEY (account, day)
) WITHOUT ROWID;

INSERT INTO daily_counts (account, day, accepted)
    SELECT account, received_at / 86400000, COUNT(*) FROM notifications
    GROUP BY account, received_at / 86400000;
