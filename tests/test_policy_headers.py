"""The X-IB-* header options."""

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.model import HeaderOptions
from mailrelay.policy.headers import MAX_CALLBACK_DATA, isOptionHeader, parseHeaderOptions
from mailrelay.smtp.replies import CONTENT_REFUSED
from tests.test_policy_support import RefusalMixin


class OptionTests(RefusalMixin, SynchronousTestCase):
    def test_none(self) -> None:
        self.assertEqual(parseHeaderOptions([("Subject", "hi")]), HeaderOptions())

    def test_all(self) -> None:
        options = parseHeaderOptions(
            [
                ("X-IB-bulk-id", "bulk-2024-01"),
                ("x-ib-NOTIFY-url", " https://hooks.example.com:8443/dlr?x=1 "),
                ("X-IB-notify-content-type", "Application/XML"),
                ("X-IB-callback-data", '{"order": 42}'),
                ("X-IB-intermediate-report", "TRUE"),
                ("X-IB-tracking-url", "http://track.example.com/t"),
                ("X-IB-something-else", "ignored"),
            ]
        )
        self.assertEqual(
            options,
            HeaderOptions(
                bulk_id="bulk-2024-01",
                notify_url="https://hooks.example.com:8443/dlr?x=1",
                notify_content_type="application/xml",
                callback_data='{"order": 42}',
                intermediate_report=True,
                tracking_url="http://track.example.com/t",
            ),
        )

    def assertOptionRefused(self, name: str, value: str) -> None:
        e = self.assertRefused(CONTENT_REFUSED, parseHeaderOptions, [(name, value)])
        self.assertIn(name, e.reply.text)

    def test_notifyUrl(self) -> None:
        for value in (
            "ftp://hooks.example.com/",
            "hooks.example.com/dlr",
            "/dlr",
            "https://",
            "https://hooks.example.com:99999/",
            "https://hooks example.com/",
            "javascript:alert(1)",
            "https://hooks.example.com/a b",
        ):
            self.assertOptionRefused("X-IB-notify-url", value)

    def test_trackingUrl(self) -> None:
        self.assertOptionRefused("X-IB-tracking-url", "not a url")

    def test_notifyContentType(self) -> None:
        self.assertOptionRefused("X-IB-notify-content-type", "text/plain")

    def test_intermediateReport(self) -> None:
        self.assertEqual(
            parseHeaderOptions([("X-IB-intermediate-report", "false")]).intermediate_report, False
        )
        self.assertOptionRefused("X-IB-intermediate-report", "yes")

    def test_callbackDataLength(self) -> None:
        data = "x" * MAX_CALLBACK_DATA
        self.assertEqual(parseHeaderOptions([("X-IB-callback-data", data)]).callback_data, data)
        self.assertOptionRefused("X-IB-callback-data", data + "x")

    def test_bulkId(self) -> None:
        self.assertOptionRefused("X-IB-bulk-id", "")
        self.assertOptionRefused("X-IB-bulk-id", "a\x00b")

    def test_givenTwice(self) -> None:
        e = self.assertRefused(
            CONTENT_REFUSED,
            parseHeaderOptions,
            [("X-IB-bulk-id", "a"), ("x-ib-bulk-id", "b")],
        )
        self.assertIn("more than once", e.reply.text)

    def test_isOptionHeader(self) -> None:
        self.assertTrue(isOptionHeader("X-IB-anything"))
        self.assertTrue(isOptionHeader("x-ib-bulk-id"))
        self.assertFalse(isOptionHeader("X-Mailer"))
