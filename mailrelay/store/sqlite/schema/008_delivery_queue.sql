-- mailrelay embedded store, schema version 8: the delivery queue of IDeliveryQueue, DKIM keys,
-- and the accounts' bounces setting.
--
-- queue: a fourth state, 'held' (an operator's; never due), which needs the table rebuilt to
-- change its CHECK (SQLite cannot alter one): the rows are copied in id order, so the new
-- table is appended to, and its index is made after the copy, in one pass. New columns:
--   pending        JSON list of the positions (in the notification's recipient list, RCPT
--                  order, from 0) of the recipients with no final outcome yet; NULL: all
--   lease          'in_flight' rows: the token of the worker's current claim
--   hold_requested 'in_flight' rows an operator held: they become 'held', not 'deferred',
--                  when their worker records a retry or gives the claim back
-- One index, (state, next_attempt), replaces queue_due and queue_by_state: due work is a range
-- of it per state (and the rowid, the notification id, that ends every index entry orders
-- equal times), and the counts per state read its prefix as they read queue_by_state.

CREATE TABLE queue_new (
    notification_id INTEGER PRIMARY KEY REFERENCES notifications (id) ON DELETE CASCADE,
    state           TEXT NOT NULL
                    CHECK (state IN ('queued', 'deferred', 'in_flight', 'held')),
    next_attempt    INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    pending         TEXT,
    lease           TEXT,
    hold_requested  INTEGER NOT NULL DEFAULT 0
);

INSERT INTO queue_new (notification_id, state, next_attempt, attempts)
    SELECT notification_id, state, next_attempt, attempts FROM queue ORDER BY notification_id;

DROP TABLE queue;

ALTER TABLE queue_new RENAME TO queue;

CREATE INDEX queue_by_state_due ON queue (state, next_attempt);

-- A sender domain's DKIM signing key (one per domain). private_key is PEM (PKCS#8).
CREATE TABLE dkim_keys (
    domain      TEXT PRIMARY KEY,
    selector    TEXT NOT NULL,
    algorithm   TEXT NOT NULL CHECK (algorithm IN ('rsa', 'ed25519')),
    private_key BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Delivery status notifications to the envelope sender on failure; on unless turned off.
ALTER TABLE accounts ADD COLUMN bounces INTEGER NOT NULL DEFAULT 1;
