"""The batched augmentations (datamodules/augment.py): their distributions, their seeding, and
test-time augmentation as validation, predict and export compute it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from base.errors import UserError
from datamodules import MEAN, STD, CIFAR10DataModule
from datamodules.augment import Augmentation, TestTimeAugmentation, TrainBatchBuilder, cutout_mask, shift, tta_logits

SIZE = 32


def builder(n: int, augmentation: Augmentation, seed: int = 0, images: torch.Tensor | None = None) -> TrainBatchBuilder:
    if images is None:
        images = torch.full((n, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    return TrainBatchBuilder(images, torch.arange(n), augmentation=augmentation, seed=seed, mean=MEAN, std=STD)


def erased(batch: torch.Tensor) -> torch.Tensor:
    """Where Cutout set a constant grey image to the mean: exactly 0 after normalisation."""
    return (batch == 0).all(dim=1)


@pytest.mark.parametrize("side", [8, 12, 16])
def test_cutout_erases_one_whole_square_per_image_anywhere_inside(side: int) -> None:
    n = 2000
    make = builder(n, Augmentation(translate=0, cutout=side))
    plan = make.plan(0)
    images, _ = make.batch(plan, 0, n)
    mask = erased(images)
    # Every image loses exactly one side x side square: the share erased is side^2 / 1024.
    assert torch.equal(mask.sum(dim=(1, 2)), torch.full((n,), side * side))
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    assert torch.equal(rows.sum(1), torch.full((n,), side)) and torch.equal(cols.sum(1), torch.full((n,), side))
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    assert torch.equal(top, plan[1].top) and torch.equal(left, plan[1].left)
    # The corner is uniform over the SIZE - side + 1 places that keep the square inside.
    places = SIZE - side + 1
    for corner in (top, left):
        counts = corner.bincount(minlength=places).double()
        assert len(counts) == places and (counts > 0).all()
        expected = n / places
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < places + 4 * (2 * places) ** 0.5, f"corner not uniform (chi2 {chi2:.1f} over {places} places)"


def test_no_cutout_erases_nothing() -> None:
    images, _ = (make := builder(300, Augmentation(translate=0))).batch(make.plan(0), 0, 300)
    assert not erased(images).any()


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
@pytest.mark.parametrize("translate", [2, 4])
def test_shifts_stay_in_range_and_bring_in_the_chosen_border(translate: int, padding: str) -> None:
    n = 1500
    # A gradient image: every pixel's value tells where it came from.
    ramp = torch.arange(SIZE, dtype=torch.uint8)
    images = (ramp[:, None] * 4).expand(n, 3, SIZE, SIZE).contiguous()  # channel 0: the source row x 4
    images[:, 1] = (ramp[None, :] * 4).expand(SIZE, SIZE)  # channel 1: the source column x 4
    make = builder(n, Augmentation(translate=translate, padding=padding), images=images)
    indices, draws = make.plan(1)
    batch, _ = make.batch((indices, draws), 0, n)
    raw = torch.round((batch * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255)
    shift_y = draws.dy - translate  # the crop offset into the padded image, as a shift of the content
    shift_x = draws.dx - translate
    assert shift_y.min() == -translate and shift_y.max() == translate
    assert shift_x.min() == -translate and shift_x.max() == translate
    # Row 16 of a crop shows source row 16 + dy; its column 16 (mirrored: 15) source column 16 + dx.
    column = torch.where(draws.flip, SIZE - 1 - 16, 16)
    assert torch.equal(raw[:, 0, 16, 16], ((16 + shift_y) * 4).float())
    assert torch.equal(raw[torch.arange(n), 1, 16, column], ((16 + shift_x) * 4).float())
    # The border brought in by a shift: zeros, or the image reflected (never a value outside it).
    shifted = raw[:, 0, 0, 0][shift_y < 0]
    if padding == "zeros":
        assert (shifted == 0).all() or translate == 0
    else:
        assert torch.equal(shifted, (-shift_y[shift_y < 0]).float() * 4)


def test_batches_depend_only_on_seed_epoch_and_batch() -> None:
    images = torch.randint(0, 256, (90, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augmentation = Augmentation(translate=4, padding="reflect", cutout=10)
    first = builder(90, augmentation, seed=5, images=images)
    torch.manual_seed(99)  # whatever the global RNG did in between
    torch.rand(1000)
    second = builder(90, augmentation, seed=5, images=images)
    for epoch in (0, 3):
        a, b = first.plan(epoch), second.plan(epoch)
        # Batch 2 built alone, or after others: the same tensor.
        assert torch.equal(first.batch(a, 64, 90)[0], second.batch(b, 64, 90)[0])
    assert not torch.equal(first.batch(first.plan(0), 0, 32)[0], first.batch(first.plan(1), 0, 32)[0])
    other_seed = builder(90, augmentation, seed=6, images=images)
    assert not torch.equal(first.batch(first.plan(0), 0, 32)[0], other_seed.batch(other_seed.plan(0), 0, 32)[0])


def test_cutout_mask_marks_the_drawn_square() -> None:
    from datamodules.augment import Draws

    draws = Draws(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                  torch.tensor([0, 4]), torch.tensor([3, 0]))
    mask = cutout_mask(draws, 2, 6, 6)[:, 0]
    assert mask.shape == (2, 6, 6)
    assert mask[0, 0:2, 3:5].all() and mask[0].sum() == 4
    assert mask[1, 4:6, 0:2].all() and mask[1].sum() == 4


def test_sizes_that_cannot_fit_are_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(UserError, match="--cutout 40: a square that large does not fit 32x32 images"):
        CIFAR10DataModule(tmp_path, cutout=40, download=False)
    with pytest.raises(UserError, match="--translate 17: at most 16 pixels on 32x32 images"):
        CIFAR10DataModule(tmp_path, translate=17, translate_padding="reflect", download=False)
    with pytest.raises(ValueError, match="padding must be one of zeros, reflect"):
        Augmentation(padding="wrap")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(["--cutout", "40"], "--cutout: must be at most 32 (the side of the 32x32 images), got 40"),
     (["--translate", "40"], "--translate: must be at most 16 (half the side of the 32x32 images), got 40"),
     (["--translate", "-1"], "--translate: must be >= 0, got -1")],
)
def test_augmentation_sizes_are_refused_with_the_flags_before_torch_loads(flags, fragment) -> None:
    """As every flag mistake: one line, exit code 2, before torch is imported."""
    import subprocess
    import sys

    from conftest import ROOT

    probe = ("import runpy, sys; sys.argv = ['train.py', *sys.argv[1:]]\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
             "finally:\n    print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *flags], cwd=ROOT, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1] == "torch not loaded"
    assert len(lines) == 2 and fragment in lines[0], result.stderr


def test_shift_moves_content_and_reflects_the_border() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    down_right = shift(image, 1, 1)
    assert torch.equal(down_right[0, 0, 1:, 1:], image[0, 0, :3, :3])
    assert torch.equal(down_right[0, 0, 0, 1:], image[0, 0, 1, :3])  # reflected: row 1 mirrored into row -1
    up_left = shift(image, -1, -1, padding="zeros")
    assert torch.equal(up_left[0, 0, :3, :3], image[0, 0, 1:, 1:]) and (up_left[0, 0, 3] == 0).all()


class _Probe(nn.Module):
    """A model whose logits are a fixed linear map of the pixels: views give different logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_tta_modes_are_the_weighted_mean_logits_of_their_views() -> None:
    torch.manual_seed(0)
    model, images = _Probe(), torch.randn(5, 3, 8, 8)
    plain, mirror = model(images), model(images.flip(3))
    assert torch.equal(tta_logits(model, images, "none"), plain)
    assert torch.equal(tta_logits(model, images, "flip"), (plain + mirror) / 2)
    views = [shift(images, d, d) for d in (-1, 1)]
    moved = sum((model(v) + model(v.flip(3))) / 2 for v in views) / 2
    torch.testing.assert_close(tta_logits(model, images, "flip-translate"), ((plain + mirror) / 2 + moved) / 2)
    assert not torch.allclose(tta_logits(model, images, "flip-translate"), tta_logits(model, images, "flip"))
    wrapped = TestTimeAugmentation(model, "flip-translate")
    assert torch.equal(wrapped(images), tta_logits(model, images, "flip-translate"))
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        tta_logits(model, images, "rotate")
