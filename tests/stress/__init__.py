"""
Stress and fault tests of issue 23, run by CI with the rest (``python3 -m twisted.trial tests``)
and bounded to a couple of minutes in all: SIGKILL under load, Redis killed and paused, a full
disk (a small tmpfs, where the machine lets us mount one), slowloris on SMTP and HTTP, and TLS
handshakes that stall. Each asserts that nothing acknowledged with a 250 is lost and that other
clients are still served; the figures they print are the ones in SECURITY.md.
"""
