"""Callbacks the trainer needs beyond Lightning's stock ones."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class NamedCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state is keyed by its file name as well.

    Lightning keys a callback's state by monitor and frequency only, so two unmonitored
    checkpoint callbacks (the per-epoch ``last`` and the periodic one) would collide.
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
            train_time_interval=self._train_time_interval,
            filename=self.filename,
        )
