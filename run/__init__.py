"""Layer 3: what a run is (its resolved configuration and folder), how it is assembled, and checkpoint reading."""
