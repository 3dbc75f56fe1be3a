-- mailrelay embedded store, schema version 1.
-- Applied by mailrelay.store.sqlite.schema when PRAGMA user_version < 1.
-- All timestamps are integer UTC milliseconds since the POSIX epoch.

CREATE TABLE accounts (
    name                 TEXT PRIMARY KEY,
    password_hash        TEXT NOT NULL,
    enabled              INTEGER NOT NULL DEFAULT 1,
    sms_enabled          INTEGER NOT NULL DEFAULT 0,
    sms_segments         INTEGER NOT NULL DEFAULT 1,
    rate_per_second      REAL,
    daily_quota          INTEGER,
    networks             TEXT NOT NULL DEFAULT '[]',   -- JSON list of CIDR strings
    require_alternative  INTEGER NOT NULL DEFAULT 0,
    require_rcpt_headers INTEGER NOT NULL DEFAULT 0,
    attachments          TEXT NOT NULL DEFAULT 'allow'
                         CHECK (attachments IN ('allow', 'strip', 'refuse')),
    max_message_size     INTEGER,
    max_recipients       INTEGER
);

CREATE TABLE api_keys (
    key_id     TEXT PRIMARY KEY,
    account    TEXT NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
    key_hash   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX api_keys_by_hash ON api_keys (key_hash);
CREATE INDEX api_keys_by_account ON api_keys (account, created_at);

CREATE TABLE senders (
    account TEXT NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
    value   TEXT NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('domain', 'address', 'sms')),
    PRIMARY KEY (account, value)
);

-- One accepted message. The id is the notification id (a 63-bit integer, see mailrelay.ids).
-- No foreign key to accounts: the record is history and outlives account changes.
CREATE TABLE notifications (
    id                  INTEGER PRIMARY KEY,
    account             TEXT NOT NULL,
    sender              TEXT NOT NULL,
    size                INTEGER NOT NULL,
    received_at         INTEGER NOT NULL,
    bulk_id             TEXT,
    notify_url          TEXT,
    notify_content_type TEXT NOT NULL,
    callback_data       TEXT,
    intermediate_report INTEGER NOT NULL DEFAULT 0,
    tracking_url        TEXT,
    client_address      TEXT NOT NULL DEFAULT '',
    helo                TEXT NOT NULL DEFAULT ''
);
CREATE INDEX notifications_by_bulk ON notifications (account, bulk_id)
    WHERE bulk_id IS NOT NULL;
CREATE INDEX notifications_by_account_time ON notifications (account, received_at);
CREATE INDEX notifications_by_time ON notifications (received_at);

CREATE TABLE recipients (
    notification_id INTEGER NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,   -- RCPT order
    address         TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    PRIMARY KEY (notification_id, position)
) WITHOUT ROWID;

CREATE TABLE messages (
    notification_id INTEGER PRIMARY KEY REFERENCES notifications (id) ON DELETE CASCADE,
    body            BLOB NOT NULL
);

-- Work for the delivery workers: a row exists while a notification still has delivery to do.
-- 'in_flight' rows carry a lease in next_attempt: a worker that dies loses its claim when the
-- lease runs out. Finished notifications leave the queue (and their body is dropped).
CREATE TABLE queue (
    notification_id INTEGER PRIMARY KEY REFERENCES notifications (id) ON DELETE CASCADE,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'deferred', 'in_flight')),
    next_attempt    INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX queue_due ON queue (next_attempt);
CREATE INDEX queue_by_state ON queue (state);

-- The per-recipient status trail; the rowid keeps insertion order for equal timestamps.
CREATE TABLE status_events (
    id              INTEGER PRIMARY KEY,
    notification_id INTEGER NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    address         TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    status_code     TEXT NOT NULL,
    status_text     TEXT NOT NULL,
    ts              INTEGER NOT NULL
);
CREATE INDEX status_events_by_notification ON status_events (notification_id, ts, id);
