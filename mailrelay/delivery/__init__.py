"""The outbound side: what happens to accepted mail (filled in by the delivery engine)."""
