"""uvit.data.sources."""
