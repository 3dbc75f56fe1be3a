"""mailrelay: the SMTP front door of a messaging platform."""
