"""uvit.storage."""
