-- mailrelay embedded store, schema version 11: the SMS gateways' message ids awaiting their
-- delivery receipts (IGatewayIds), and what expiry needs to find a notification's reports.
--
-- gateway_ids: one row per part of a text not settled yet, in the file that holds the
-- notification, going with it (ON DELETE CASCADE). text_id names the text the part belongs to
-- (its first part's id), so a text is complete when no row of its text_id is left. until (ms)
-- is when the row is forgotten, answered or not.
CREATE TABLE gateway_ids (
    gateway_id      TEXT PRIMARY KEY,
    text_id         TEXT NOT NULL,
    notification_id INTEGER NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    address         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    until           INTEGER NOT NULL
);

CREATE INDEX gateway_ids_by_text ON gateway_ids (text_id);
CREATE INDEX gateway_ids_by_notification ON gateway_ids (notification_id);
CREATE INDEX gateway_ids_until ON gateway_ids (until);

-- Expiry deletes the reports of each notification it forgets (reports and report_attempts
-- have no foreign key: see 010).
CREATE INDEX reports_by_notification ON reports (notification_id);
