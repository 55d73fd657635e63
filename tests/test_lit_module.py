"""The LightningModule: the course recipe's optimiser and schedule, and that a step learns."""
import pytest
import torch

from base.datasets import CIFAR10
from base.schema import NetworkOptions, OptimOptions
from lit_modules import ImageClassifier
from models import build_model


def make_module(**recipe) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("vgg16", OptimOptions(**recipe), backbone=build_model("vgg16"))


def test_defaults_are_the_course_recipe():
    module = make_module()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert isinstance(module.criterion, torch.nn.CrossEntropyLoss)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_learning_rate_is_divided_by_three_every_20_epochs():
    config = make_module().configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[19] == pytest.approx(1e-3)
    assert lrs[20] == pytest.approx(1e-3 / 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 9)


def test_one_optimisation_step_lowers_the_loss_on_a_fixed_batch():
    module = make_module()
    optimizer = module.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(16, 3, 32, 32, generator=generator), torch.arange(16) % 10
    module.train()

    def loss_with_fixed_dropout() -> torch.Tensor:
        torch.manual_seed(2)  # the same dropout masks before and after the step
        return module.criterion(module(images), labels)

    before = loss_with_fixed_dropout()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_with_fixed_dropout()
    assert after.item() < before.item()


def test_hyperparameters_are_plain_values_enough_to_rebuild_the_backbone():
    dataset = CIFAR10.__class__("tiny", tuple(f"c{i}" for i in range(10)), CIFAR10.mean, CIFAR10.std)
    module = ImageClassifier(NetworkOptions(model="resnet50", identity_shortcut=True), dataset=dataset)
    hparams = dict(module.hparams)
    assert set(hparams) == {"network", "optim", "dataset"}
    assert hparams["network"]["model"] == "resnet50" and hparams["network"]["identity_shortcut"] is True
    assert hparams["dataset"]["classes"] == [f"c{i}" for i in range(10)]
    allowed = (str, int, float, bool, type(None), list, dict)
    assert all(isinstance(value, allowed) for group in hparams.values() for value in group.values())
    rebuilt = ImageClassifier(**hparams)
    assert rebuilt.network == module.network and rebuilt.dataset == dataset
    # The identity shortcut has fewer weights than the course's projection everywhere.
    assert set(rebuilt.backbone.state_dict()) == set(module.backbone.state_dict())
    assert len(module.backbone.state_dict()) < len(build_model("resnet50").state_dict())
    # A VGG's dropout holds no weight: the rebuilt classifier has it from the hyper-parameters.
    vgg = ImageClassifier(**dict(ImageClassifier(NetworkOptions(model="vgg16", dropout=0.0)).hparams))
    assert vgg.network.options["dropout"] == 0.0 and vgg.backbone.classifier[0].p == 0.0


def test_flat_hyperparameters_of_checkpoints_before_the_groups_still_build_the_module():
    """Lightning passes a checkpoint's hyper_parameters as keywords: the flat ones written before the
    option groups (model_name, model_options, lr, ...) are read into the groups."""
    module = ImageClassifier(
        model_name="resnet50", num_classes=10, model_options={"identity_shortcut": True},
        class_names=[f"c{i}" for i in range(10)], optimizer="sgd", lr=0.05, tta="flip",
    )
    assert module.network == NetworkOptions(model="resnet50", identity_shortcut=True, tta="flip")
    assert module.optim.optimizer == "sgd" and module.optim.lr == 0.05
    assert module.dataset.classes[3] == "c3" and module.dataset.mean == CIFAR10.mean
    with pytest.raises(TypeError, match="lrr"):
        ImageClassifier(model_name="vgg16", lrr=0.1)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_per_step_schedules_need_and_use_the_trainer_length(scheduler):
    module = make_module(optimizer="sgd", nesterov=True, scheduler=scheduler, lr=0.1)

    class FakeTrainer:
        estimated_stepping_batches = 100

    module.trainer = FakeTrainer()  # type: ignore[assignment]
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].param_groups[0]["nesterov"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["scheduler"].total_steps if scheduler == "onecycle" else True


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_module(optimizer="lbfgs")
