"""uvit.train."""
