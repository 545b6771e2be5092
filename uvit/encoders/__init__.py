"""uvit.encoders."""
