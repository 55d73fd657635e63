"""Grad-CAM (models/explain.py, predict.py --explain): the map is high where the evidence is."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from robustness import assert_one_line_error
from torch import nn

from models import build_model
from models.explain import cam_layer, grad_cam


class ColourEvidence(nn.Module):
    """Class 0's logit is the amount of red in the picture, class 1's the amount of green.

    Its ``features`` keep the picture's layout (a 1x1 convolution), so Grad-CAM on them must
    point at the red pixels for class 0 and at the green ones for class 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x)).mean(dim=(2, 3))


def test_the_map_is_high_where_the_evidence_for_the_class_is():
    picture = torch.zeros(1, 3, 32, 32)
    picture[0, 0, :12, :12] = 1.0  # red square, top left
    picture[0, 1, 20:, 20:] = 1.0  # green square, bottom right
    model = ColourEvidence()
    red, green = grad_cam(model, picture.repeat(2, 1, 1, 1), torch.tensor([0, 1]), model.features)
    assert red[:12, :12].mean() > 0.9 and red[20:, 20:].max() < 0.1
    assert green[20:, 20:].mean() > 0.9 and green[:12, :12].max() < 0.1


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "resnet50"])
def test_course_networks_give_maps_at_the_input_size_and_are_left_as_they_were(name):
    model = build_model(name).train()
    maps = grad_cam(model, torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9]), cam_layer(model, name))
    assert maps.shape == (3, 32, 32) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


def test_predict_explain_writes_each_picture_beside_its_heat_map_at_its_own_size(cli, tmp_path):
    checkpoint = tmp_path / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), checkpoint)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (120, 80), (200, 30, 30)).save(photo)
    out = tmp_path / "explained"
    result = cli("predict", "--ckpt", str(checkpoint), str(photo), "--explain", str(out), "--accelerator", "cpu")
    assert result.code == 0, result.err
    written = sorted(out.iterdir())
    assert len(written) == 1 and written[0].name.startswith("photo.gradcam-")
    with Image.open(written[0]) as picture:
        assert picture.size == (240, 80)
    again = cli("predict", "--ckpt", str(checkpoint), str(photo), "--explain", str(out), "--explain-class", "cat",
                "--accelerator", "cpu")
    assert again.code == 0 and any(p.name == "photo.gradcam-cat.png" for p in out.iterdir())


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(["--explain-class", "unicorn", "--explain", "x"], "not a class"), (["--explain-class", "cat"], "needs --explain")],
)
def test_explain_flags_are_checked_before_any_work(cli, tmp_path, flags, fragment):
    """A class that does not exist, or --explain-class alone."""
    checkpoint = tmp_path / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), checkpoint)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    assert_one_line_error(cli("predict", "--ckpt", str(checkpoint), str(photo), *flags), fragment)
