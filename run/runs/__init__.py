"""A training run's life: its folder (``folder``), its history (``history``), how it starts
(``start``) and how its options are resolved (``resolve``)."""
