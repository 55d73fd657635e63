"""Layer 0: what every other layer may use: the user-facing error type and atomic file writing."""
