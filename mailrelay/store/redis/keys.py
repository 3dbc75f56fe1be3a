"""
Where the Redis store keeps what, under one key prefix (``mailrelay:`` by default).

Every timestamp is integer UTC milliseconds since the POSIX epoch; every string is UTF-8.

===================================  =====================================================
key                                  value
===================================  =====================================================
``account:<name>``                   hash: the Account's fields (absent field = None;
                                     booleans ``1``/``0``; ``networks`` as JSON)
``accounts``                         set of account names
``apikey:<sha256>``                  hash ``key_id``, ``account``, ``created``, ``revoked``
                                     (``1``/``0``); kept when revoked, so a hash stays taken
``apikey-id:<keyId>``                string: the sha256 of that key (key ids are unique)
``apikeys:<account>``                sorted set of the account's *active* keys' sha256,
                                     scored by ``apikey-sequence`` (insertion order)
``apikey-sequence``                  counter for the scores above
``senders:<account>``                hash value -> kind (``domain``/``address``/``sms``)
``notification:<id>``                hash: the Notification's fields, ``recipients`` as a
                                     JSON list of ``[address, channel]``, ``received``;
                                     ``attempts``: claims so far (absent: none);
                                     ``pending``: JSON list of the positions (from 0, in
                                     ``recipients``) still to deliver (absent: all);
                                     ``lease``: the current claim's token while in flight;
                                     ``hold``: ``1`` while in flight and held by an operator
                                     (held when its worker records a retry);
                                     ``received_events`` = ``implied``: the CAAS_RECEIVED
                                     events are these recipients at ``received`` (absent
                                     in older notifications: they are in ``events:<id>``)
``body:<id>``                        string: the message bytes, until delivery completes
``events:<id>``                      list of JSON ``[address, channel, code, text, ms]``,
                                     appended (RPUSH) in insertion order: the events after
                                     CAAS_RECEIVED (absent until there is one)
``queue:queued``                     sorted sets of notification ids scored by the next
``queue:deferred``                   attempt (``in_flight``: by the end of the worker's
``queue:in_flight``                  lease; ``held``: as it was when held); an id is in at
``queue:held``                       most one of them, and only while it has recipients
                                     to deliver
``accepted:<account>``               sorted set of the account's ids by received time
                                     (daily quotas: ``acceptedSince``)
``received``                         sorted set of every id by received time (``expire``)
``bulk:<n>:<account>:<bulkId>``      sorted set of ids by received time; ``n`` is the
                                     account's length in UTF-8 bytes, so that colons in
                                     names cannot make two pairs share a key
``instance``                         counter handing out notification-id instance numbers
``instance-lease:<n>``               string: the token of the open store using instance
                                     ``n``, expiring unless renewed
``dkim:<domain>``                    hash ``selector``, ``algorithm``, ``private_key`` (PEM
                                     bytes), ``created``: the domain's DKIM signing key
``dkim-domains``                     set of the domains that have a ``dkim:<domain>``
``report:<reportId>``                hash ``data`` (the PendingReport as JSON), ``attempts``,
                                     ``lease`` (while a dispatcher holds it): the outbox
``reports-due``                      sorted set of report ids by due time (held ones: by the
                                     end of their lease)
``reports-of:<id>``                  set of the ids of the notification's reports in the
                                     outbox (``expire`` forgets them with it)
``report-attempts:<id>``             list of JSON attempts of the notification's reports
``gone-urls``                        set of callback URLs that answered 410 Gone
``webhook-secrets:<account>``        string: JSON list of the account's signing secrets
``shared-key:<name>``                string: a key made once (the tracking tokens' MAC key)
``gateway-id:<gatewayId>``           hash ``n`` (notification id), ``address``, ``channel``,
                                     ``text``: an SMS gateway's id of a part not settled
                                     yet, and the text it is part of; expires (PEXPIREAT)
                                     at the time it was given
``gateway-text:<text>``              set of the ids of the text's parts not settled yet
                                     (``<text>``: its first part's id); same expiry
``gateway-texts:<id>``               sorted set of the notification's texts by expiry,
                                     expiring with the last (``expire`` forgets them)
===================================  =====================================================

The Lua scripts in :mod:`mailrelay.store.redis.scripts` build some of these names themselves
from the prefixes :class:`Keys` hands them (``Keys.notification("")`` and so on), so a change
of naming here is a change there too.
"""

from __future__ import annotations

from mailrelay.model import QueueState

QUEUE_STATES: tuple[QueueState, ...] = ("queued", "deferred", "in_flight", "held")


class Keys:
    """The names of the keys of one store, all starting with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.accounts = f"{prefix}accounts"
        self.apiKeySequence = f"{prefix}apikey-sequence"
        self.received = f"{prefix}received"
        self.instance = f"{prefix}instance"
        self.queues = tuple(f"{prefix}queue:{state}" for state in QUEUE_STATES)
        """The ``queued``, ``deferred``, ``in_flight`` and ``held`` sorted sets, in that
        order (that of QUEUE_STATES)."""
        self.dkimDomains = f"{prefix}dkim-domains"

    def instanceLease(self, number: int) -> str:
        """Held (SET NX with an expiry, renewed) by the open store using instance ``number``."""
        return f"{self.prefix}instance-lease:{number}"

    def account(self, name: str) -> str:
        return f"{self.prefix}account:{name}"

    def apiKey(self, keyHash: str) -> str:
        return f"{self.prefix}apikey:{keyHash}"

    def apiKeyId(self, keyId: str) -> str:
        return f"{self.prefix}apikey-id:{keyId}"

    def apiKeys(self, account: str) -> str:
        return f"{self.prefix}apikeys:{account}"

    def senders(self, account: str) -> str:
        return f"{self.prefix}senders:{account}"

    def notification(self, notificationId: str) -> str:
        return f"{self.prefix}notification:{notificationId}"

    def body(self, notificationId: str) -> str:
        return f"{self.prefix}body:{notificationId}"

    def events(self, notificationId: str) -> str:
        return f"{self.prefix}events:{notificationId}"

    @property
    def reportsDue(self) -> str:
        return f"{self.prefix}reports-due"

    @property
    def goneUrls(self) -> str:
        return f"{self.prefix}gone-urls"

    def report(self, reportId: str) -> str:
        return f"{self.prefix}report:{reportId}"

    def reportAttempts(self, notificationId: str) -> str:
        return f"{self.prefix}report-attempts:{notificationId}"

    def reportsOf(self, notificationId: str) -> str:
        return f"{self.prefix}reports-of:{notificationId}"

    def gatewayId(self, gatewayId: str) -> str:
        return f"{self.prefix}gateway-id:{gatewayId}"

    def gatewayText(self, text: str) -> str:
        return f"{self.prefix}gateway-text:{text}"

    def gatewayTexts(self, notificationId: str) -> str:
        return f"{self.prefix}gateway-texts:{notificationId}"

    def webhookSecrets(self, account: str) -> str:
        return f"{self.prefix}webhook-secrets:{account}"

    def sharedKey(self, name: str) -> str:
        return f"{self.prefix}shared-key:{name}"

    def dkim(self, domain: str) -> str:
        return f"{self.prefix}dkim:{domain}"

    def accepted(self, account: str) -> str:
        return f"{self.prefix}accepted:{account}"

    @property
    def bulkPrefix(self) -> str:
        """What every bulk index key starts with (the expire script appends the rest)."""
        return f"{self.prefix}bulk:"

    def bulk(self, account: str, bulkId: str) -> str:
        return f"{self.bulkPrefix}{len(account.encode())}:{account}:{bulkId}"
