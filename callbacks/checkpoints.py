"""The run's checkpoint callback: Lightning's ModelCheckpoint, keyed by file name, and movable."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class NamedCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state is keyed by its file name, and survives a moved run folder.

    Lightning keys a callback's state by monitor and frequency only, so two unmonitored
    checkpoint callbacks (the per-epoch ``last`` and the periodic one) would collide.

    Lightning also drops the best score and the kept checkpoints when the checkpoint folder's
    path differs from the one saved (a run folder moved, renamed, copied with rsync): the first
    resumed epoch would then replace ``best.ckpt`` without comparing scores. The checkpoints
    moved with the folder, so their saved paths are rebased onto the new folder instead.
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:
            state_dict = _rebase(state_dict, Path(saved), Path(self.dirpath))
        super().load_state_dict(state_dict)


def _rebase(state_dict: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    def moved(path: Any) -> Any:
        if not path:
            return path
        path = Path(path)
        return str(new / path.relative_to(old)) if path.is_relative_to(old) else str(path)

    rebased = dict(state_dict, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in rebased:
            rebased[key] = moved(rebased[key])
    if "best_k_models" in rebased:
        rebased["best_k_models"] = {moved(path): score for path, score in rebased["best_k_models"].items()}
    return rebased
