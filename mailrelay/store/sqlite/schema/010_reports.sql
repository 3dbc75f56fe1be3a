-- mailrelay embedded store, schema version 10: the outbox of delivery and tracking reports
-- (SPEC §8.4, §8.5), their attempts, and what they are signed with.
--
-- reports: written in the same transaction as the status events they report, in the file
-- that holds the notification. next_attempt is when the report is due; while a dispatcher
-- holds it (lease set) it is the end of that lease, so a dispatcher that died leaves it due
-- again when the lease runs out. result is the JSON of one entry of the document's results.

CREATE TABLE reports (
    report_id       TEXT PRIMARY KEY,
    notification_id INTEGER NOT NULL,
    account         TEXT NOT NULL,
    url             TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('delivery', 'tracking')),
    result          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    next_attempt    INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    lease           TEXT
);

CREATE INDEX reports_due ON reports (next_attempt);

-- Every POST of a report (mailrelay reports list): kept with the notification's trail.
CREATE TABLE report_attempts (
    notification_id INTEGER NOT NULL,
    report_id       TEXT NOT NULL,
    host            TEXT NOT NULL,
    code            INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    at              INTEGER NOT NULL
);

CREATE INDEX report_attempts_by_notification ON report_attempts (notification_id);

-- URLs that answered 410 Gone: no report goes there any more (main file).
CREATE TABLE gone_urls (
    url TEXT PRIMARY KEY,
    at  INTEGER NOT NULL
);

-- Each account's Standard Webhooks secrets, a JSON list, newest first (main file).
CREATE TABLE webhook_secrets (
    account TEXT PRIMARY KEY,
    secrets TEXT NOT NULL
);

-- Keys generated once and shared by every process (the tracking tokens' MAC key).
CREATE TABLE shared_keys (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
