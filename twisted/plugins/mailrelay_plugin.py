from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.tap",
    "SMTP submission relay with durable queue and status API",
    "mailrelay",
)
