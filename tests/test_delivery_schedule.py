"""The retry schedule: doubling from retry_min to retry_max with jitter, bounded by the
queue lifetime."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailrelay.config import configFromSource
from mailrelay.delivery.schedule import RetrySchedule


class RetryScheduleTests(TestCase):
    def schedule(self, random: float = 0.5) -> RetrySchedule:
        return RetrySchedule(minimum=300, maximum=3600, lifetime=5 * 86400, random=lambda: random)

    def test_doublesUpToTheMaximum(self) -> None:
        delays = [self.schedule().delay(attempts) for attempts in range(1, 8)]
        self.assertEqual(delays, [300, 600, 1200, 2400, 3600, 3600, 3600])

    def test_jitterWithinTenPercent(self) -> None:
        self.assertAlmostEqual(self.schedule(random=0.0).delay(1), 270)
        self.assertAlmostEqual(self.schedule(random=1.0).delay(1), 330)
        self.assertAlmostEqual(self.schedule(random=1.0).delay(50), 3960)

    def test_lastAttemptAtTheEndOfTheLifetime(self) -> None:
        schedule = self.schedule()
        received = 1_000_000.0
        end = received + 5 * 86400
        self.assertEqual(schedule.nextAttempt(40, received, end - 60), end)
        self.assertEqual(schedule.nextAttempt(1, received, received + 10), received + 310)
        self.assertFalse(schedule.expired(received, end - 1))
        self.assertTrue(schedule.expired(received, end))

    def test_fromConfig(self) -> None:
        config = configFromSource('[delivery]\nretry_min = "1m"\nretry_max = "2h"\n')
        schedule = RetrySchedule.fromConfig(config.delivery)
        self.assertEqual(
            (schedule.minimum, schedule.maximum, schedule.lifetime), (60, 7200, 432000)
        )

    def test_minimumAboveMaximumRefused(self) -> None:
        from mailrelay.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            configFromSource('[delivery]\nretry_min = "2h"\nretry_max = "1h"\n')
        self.assertIn("delivery.retry_min", str(caught.exception))
