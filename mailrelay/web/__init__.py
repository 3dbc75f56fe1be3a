"""
The web endpoint (``[web] endpoint``): the notification status API of SPEC §7, ``/healthz``,
``/metrics`` and ``/openapi.json``, served by :func:`makeWebSite`'s twisted.web site.
"""

from mailrelay.web.health import ListenerState, serviceListeners
from mailrelay.web.site import makeWebSite

__all__ = ["ListenerState", "makeWebSite", "serviceListeners"]
