-- mailrelay embedded store, schema version 4: a new notification keeps its recipients in its own
-- row, as a JSON list of [address, channel] in RCPT order, instead of one row each in
-- recipients, and its CAAS_RECEIVED events (one per recipient, at received_at) are implied by
-- that list instead of being rows of status_events: an accepted message is then three rows
-- (notification, body, queue entry) whatever its number of recipients. Later events are rows
-- of status_events as before. Notifications from before this version keep their rows
-- (recipient_list NULL) and are read as they were.

ALTER TABLE notifications ADD COLUMN recipient_list TEXT;
