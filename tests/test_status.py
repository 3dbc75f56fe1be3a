"""Tests for mailrelay.status: the SPEC §7 status document."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.model import Recipient, StatusEvent
from mailrelay.status import formatTimestamp, recipientMatches, statusDocument

NID = "100000009020772"
T0 = datetime(2015, 3, 8, 14, 58, 30, 252000, tzinfo=UTC)
EMAIL = Recipient("name1@customer.com", "email")
PHONE = Recipient("+4477331234567", "sms")


def event(recipient: Recipient, code: str, when: datetime, text: str = "Successful") -> StatusEvent:
    return StatusEvent(NID, recipient, code, text, when)


class StatusDocumentTests(SynchronousTestCase):
    def test_specExample(self) -> None:
        """The document of SPEC §7, key for key."""
        document = statusDocument(NID, [event(EMAIL, "CAAS_RECEIVED", T0)])
        self.assertEqual(
            json.loads(json.dumps(document)),
            {
                "SAPnotification": {
                    "notificationId": "100000009020772",
                    "status": [
                        {
                            "statusCode": "CAAS_RECEIVED",
                            "statusText": "Successful",
                            "channel": "email",
                            "recipient": "email:name1@customer.com",
                            "timestamp": "2015-03-08 14:58:30.252",
                        }
                    ],
                }
            },
        )

    def test_noEvents(self) -> None:
        self.assertEqual(
            statusDocument("42", []), {"SAPnotification": {"notificationId": "42", "status": []}}
        )

    def test_oldestFirstStable(self) -> None:
        later = T0 + timedelta(seconds=1)
        events = [
            event(EMAIL, "CH_SENT", later + timedelta(seconds=1)),
            event(EMAIL, "CAAS_SENT", later),
            event(PHONE, "CAAS_SENT", later),
            event(EMAIL, "CAAS_RECEIVED", T0),
        ]
        status = statusDocument(NID, events)["SAPnotification"]["status"]
        self.assertEqual(
            [(s["statusCode"], s["recipient"]) for s in status],
            [
                ("CAAS_RECEIVED", "email:name1@customer.com"),
                ("CAAS_SENT", "email:name1@customer.com"),
                ("CAAS_SENT", "sms:+4477331234567"),
                ("CH_SENT", "email:name1@customer.com"),
            ],
        )
        self.assertEqual(status[2]["channel"], "sms")

    def test_recipientFilter(self) -> None:
        events = [event(EMAIL, "CAAS_RECEIVED", T0), event(PHONE, "CAAS_RECEIVED", T0)]
        for wanted, expected in [
            ("email:name1@customer.com", "email:name1@customer.com"),
            ("email:Name1@Customer.COM", "email:name1@customer.com"),
            ("sms:+4477331234567", "sms:+4477331234567"),
            ("sms: 4477331234567", "sms:+4477331234567"),  # "+" decoded as a space
            ("sms:004477331234567", "sms:+4477331234567"),
        ]:
            status = statusDocument(NID, events, wanted)["SAPnotification"]["status"]
            self.assertEqual([s["recipient"] for s in status], [expected], wanted)
        for other in ("email:other@customer.com", "sms:+4400000000", "name1@customer.com", ""):
            self.assertEqual(statusDocument(NID, events, other)["SAPnotification"]["status"], [])

    def test_channelMustMatch(self) -> None:
        self.assertFalse(recipientMatches(PHONE, "email:+4477331234567"))
        self.assertFalse(recipientMatches(EMAIL, "sms:name1@customer.com"))


class FormatTimestampTests(SynchronousTestCase):
    def test_millisecondsUTC(self) -> None:
        self.assertEqual(formatTimestamp(T0), "2015-03-08 14:58:30.252")
        self.assertEqual(formatTimestamp(T0.replace(microsecond=999999)), "2015-03-08 14:58:30.999")
        self.assertEqual(formatTimestamp(T0.replace(microsecond=0)), "2015-03-08 14:58:30.000")

    def test_otherZonesAndNaive(self) -> None:
        cet = timezone(timedelta(hours=1))
        self.assertEqual(formatTimestamp(T0.astimezone(cet)), "2015-03-08 14:58:30.252")
        self.assertEqual(formatTimestamp(T0.replace(tzinfo=None)), "2015-03-08 14:58:30.252")
