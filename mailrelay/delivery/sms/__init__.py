"""
The SMS channel (SPEC §8.3), driven by :class:`~mailrelay.delivery.engine.DeliveryEngine` like
the e-mail one. Read it in this order:

- :mod:`~mailrelay.delivery.sms.gateway` -- the one interface both gateways implement, and
  :class:`~mailrelay.delivery.sms.gateway.SmsChannel`, what the engine calls;
- :mod:`~mailrelay.delivery.sms.segments` -- a text as GSM-7 or UCS-2 short messages, with
  concatenation headers;
- :mod:`~mailrelay.delivery.sms.smpp` and :mod:`~mailrelay.delivery.sms.pdu` -- the SMPP 3.4
  transceiver and its PDUs;
- :mod:`~mailrelay.delivery.sms.http` -- the Infobip-style HTTP gateway and its signed receipts;
- :mod:`~mailrelay.delivery.sms.receipts` -- receipts into ``CH_SENT`` / ``CH_FAILED``;
- :mod:`~mailrelay.delivery.sms.build` -- all of it made from ``[sms]``.
"""
