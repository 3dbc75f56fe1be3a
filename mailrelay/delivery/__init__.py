"""
The outbound side: accepted mail leaves (SPEC §8).

Read it in this order:

- :mod:`~mailrelay.delivery.service` -- the loop, a Twisted service of the relay's tree: take
  due work from the store under a lease, keep the lease alive, give it back at stop;
- :mod:`~mailrelay.delivery.engine` -- one attempt as named steps: start, prepare (DKIM),
  route, send, bounce, record (every outcome and its status event in one write);
- :mod:`~mailrelay.delivery.router` -- where recipients go: the smarthost, or each domain's
  MX hosts (:mod:`~mailrelay.delivery.smtp.mx`) under its MTA-STS policy
  (:mod:`~mailrelay.delivery.smtp.mtasts`);
- :mod:`~mailrelay.delivery.smtp.pool` and :mod:`~mailrelay.delivery.smtp.client` -- the ESMTP
  client: connections bounded per destination and reused, one transaction per destination;
- :mod:`~mailrelay.delivery.schedule` -- when to try again, and when to give up;
- :mod:`~mailrelay.delivery.build` -- all of it made from ``[delivery]``.
"""
