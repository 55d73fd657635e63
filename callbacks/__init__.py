"""Layer 2: the Trainer callbacks and the checkpoint-IO plugin of the project."""
