"""The model zoo (create_model) and the ImageClassifier Module, without a Trainer."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from datapipe.errors import ConfigError, DatapipeError
from datapipe.models import ImageClassifier, create_model, list_models, register_model

SHAPES = [(1, 28), (3, 32), (3, 64)]  # (channels, side)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_list_models_is_sorted_and_has_the_zoo():
    names = list_models()
    assert names == sorted(names)
    assert {"mlp", "lenet", "resnet18"} <= set(names)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet18"])
@pytest.mark.parametrize("channels,side", SHAPES)
def test_each_model_outputs_batch_by_num_classes(name, channels, side):
    net = create_model(name, num_classes=7, in_channels=channels, image_size=side).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, side, side))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet18"])
def test_models_take_non_square_images(name):
    net = create_model(name, num_classes=5, in_channels=3, image_size=(32, 48)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 48)).shape == (2, 5)


def test_lenet_for_mnist_has_the_standard_61706_parameters():
    net = create_model("lenet", num_classes=10, in_channels=1, image_size=28)
    # conv1 156 + conv2 2416 + fc1 400*120+120 + fc2 120*84+84 + fc3 84*10+10
    assert n_params(net) == 156 + 2416 + 48120 + 10164 + 850 == 61706
    assert net.fc1.in_features == 16 * 5 * 5


def test_lenet_flatten_size_follows_image_size_and_channels():
    net = create_model("lenet", num_classes=10, in_channels=3, image_size=32)
    assert net.conv1.in_channels == 3
    assert net.fc1.in_features == 16 * 6 * 6
    assert n_params(net) == 83126


def test_lenet_batchnorm_option_adds_norm_layers():
    net = create_model("lenet", 10, 1, 28, batchnorm=True)
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn2, nn.BatchNorm2d)
    assert n_params(net) == 61706 + 2 * (6 + 16)


def test_lenet_rejects_images_too_small_for_its_pools():
    with pytest.raises(ConfigError, match="at least 12x12"):
        create_model("lenet", 10, 1, 8)


def test_mlp_sizes_and_hidden_option():
    net = create_model("mlp", num_classes=10, in_channels=1, image_size=28)
    assert n_params(net) == (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10) == 269322
    small = create_model("mlp", 10, 3, 32, hidden=64, dropout=0.5)
    assert small.fc1.in_features == 3 * 32 * 32 and small.fc1.out_features == 64
    assert small.dropout.p == 0.5
    # dropout=0 keeps the (no-op) layer, so the state dict keys never depend on it
    assert create_model("mlp", 10, 1, 28).state_dict().keys() == create_model(
        "mlp", 10, 1, 28, dropout=0.3).state_dict().keys()


def test_resnet18_small_images_get_the_cifar_stem():
    net = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 3 and net.conv1.out_channels == 64
    assert isinstance(net.maxpool, nn.Identity)
    assert net.fc.out_features == 10
    assert n_params(net) == 11_173_962


def test_resnet18_grayscale_small_images_take_one_channel():
    net = create_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3)


def test_resnet18_large_images_keep_the_imagenet_stem():
    net = create_model("resnet18", num_classes=10, in_channels=3, image_size=224).eval()
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, nn.MaxPool2d)
    assert n_params(net) == 11_181_642
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_resnet18_large_images_adapt_conv1_to_the_channels():
    net = create_model("resnet18", num_classes=4, in_channels=1, image_size=96)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (7, 7)
    assert isinstance(net.maxpool, nn.MaxPool2d)


def test_importing_models_does_not_import_torchvision():
    code = "import sys, datapipe.models; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_model_suggests_close_names_and_lists_all():
    with pytest.raises(ConfigError) as info:
        create_model("lenet5", 10, 1, 28)
    message = str(info.value)
    assert "did you mean lenet" in message
    assert "known: " + ", ".join(list_models()) in message
    assert "\n" not in message
    assert isinstance(info.value, DatapipeError)


def test_unknown_model_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"no option 'hidden' \(its options: batchnorm\)"):
        create_model("lenet", 10, 1, 28, hidden=128)


@pytest.mark.parametrize("size", [0, -3, (28,), (28, 0), 2.5, "28"])
def test_bad_image_size_is_a_config_error(size):
    with pytest.raises(ConfigError, match="image_size"):
        create_model("mlp", 10, 1, size)


def test_register_model_adds_a_swappable_builder():
    @register_model("tiny-test-net")
    def tiny(num_classes, in_channels, height, width, *, width_mult: int = 1):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, num_classes))

    try:
        assert "tiny-test-net" in list_models()
        model = ImageClassifier("tiny-test-net", num_classes=3, in_channels=1, image_size=12)
        assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 3)
        with pytest.raises(ConfigError, match="already registered"):
            register_model("tiny-test-net", lambda *a: nn.Identity())
    finally:
        from datapipe import models
        models._MODELS.pop("tiny-test-net", None)


# ---------------------------------------------------------------------- ImageClassifier


def test_classifier_defaults_are_lenet_for_mnist():
    model = ImageClassifier()
    assert n_params(model) == 61706
    assert model.hparams == {
        "model": "lenet", "num_classes": 10, "in_channels": 1, "image_size": 28,
        "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, "scheduler": None, "net": None,
    }
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_from_datamodule_sizes_the_model_from_the_data():
    dm = SimpleNamespace(name="fake", num_classes=100, dims=(3, 32, 32), classes=[])
    model = ImageClassifier.from_datamodule(dm, model="resnet18", lr=0.1, optimizer="sgd")
    assert (model.hparams["num_classes"], model.hparams["in_channels"]) == (100, 3)
    assert model.hparams["image_size"] == 32
    assert model.hparams["model"] == "resnet18" and model.hparams["optimizer"] == "sgd"
    assert model.net.fc.out_features == 100 and model.net.conv1.in_channels == 3


def test_from_datamodule_keeps_non_square_dims_and_model_options():
    dm = SimpleNamespace(name="fake", num_classes=4, dims=(1, 28, 40))
    model = ImageClassifier.from_datamodule(dm, model="mlp", hidden=32)
    assert model.hparams["image_size"] == (28, 40)
    assert model.net.fc1.in_features == 28 * 40 and model.net.fc1.out_features == 32


def test_custom_net_with_wrong_output_size_is_refused_at_construction():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="outputs 10 classes but the data has 47"):
        ImageClassifier(net=net, num_classes=47)


def test_custom_net_that_cannot_take_the_images_is_a_config_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="fails on one 3x32x32 image"):
        ImageClassifier(net=net, num_classes=10, in_channels=3, image_size=32)


def test_custom_net_is_wrapped_and_its_train_mode_kept():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    net[2].eval()  # a deliberately frozen norm layer stays as the user left it
    model = ImageClassifier(net=net, num_classes=10)
    assert model.net is net
    assert net.training and not net[2].training
    assert model.hparams["net"].endswith("Sequential")


def test_hparams_of_a_custom_net_cannot_rebuild_it():
    model = ImageClassifier(net=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), num_classes=10)
    with pytest.raises(ConfigError, match="custom net .*torch.nn.modules.container.Sequential"):
        ImageClassifier(**model.hparams)


def test_custom_net_refuses_registry_model_options():
    with pytest.raises(ConfigError, match="hidden"):
        ImageClassifier(net=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), hidden=64)


def test_labels_beyond_the_logits_are_a_config_error_naming_both_sizes():
    model = ImageClassifier("mlp", num_classes=10, hidden=8)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 11, 2])
    with pytest.raises(ConfigError, match="outputs 10 classes but the data has at least 12"):
        model.training_step((x, y), 0)


def test_images_of_the_wrong_size_are_a_config_error():
    model = ImageClassifier("lenet")
    with pytest.raises(ConfigError, match="built for 1x28x28 images but the batch has 3x32x32"):
        model.training_step((torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), 0)


def test_uint8_images_are_a_config_error_asking_for_normalization():
    model = ImageClassifier("lenet")
    batch = (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="torch.uint8 images.*normalize"):
        model.validation_step(batch, 0)


@pytest.mark.parametrize("name,kwargs", [
    ("mlp", {"hidden": 64, "dropout": 0.1}),
    ("lenet", {"batchnorm": True}),
    ("resnet18", {}),
])
def test_hparams_rebuild_the_same_architecture_and_load_its_weights(name, kwargs):
    model = ImageClassifier(name, num_classes=5, in_channels=3, image_size=32,
                            optimizer="adamw", **kwargs)
    rebuilt = ImageClassifier(**model.hparams)
    assert str(rebuilt) == str(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_hparams_survive_a_json_round_trip_with_a_tuple_size():
    import json

    model = ImageClassifier("lenet", num_classes=3, image_size=(28, 36))
    rebuilt = ImageClassifier(**json.loads(json.dumps(model.hparams)))  # tuple -> list
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.image_size == (28, 36)


@pytest.mark.parametrize("name,optimizer,lr,steps", [
    ("mlp", "adam", 1e-3, 10),
    ("mlp", "adamw", 1e-3, 10),
    ("mlp", "sgd", 0.05, 10),
    ("lenet", "adam", 3e-3, 20),
])
def test_training_steps_without_a_trainer_reduce_the_loss(name, optimizer, lr, steps):
    model = ImageClassifier(name, num_classes=4, lr=lr, optimizer=optimizer)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 4, (16,))
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    model.train()
    losses = []
    for step in range(steps):
        loss = model.training_step((x, y), step)  # self.log is a no-op without a Trainer
        assert loss.dim() == 0 and loss.requires_grad
        model.optimizer_zero_grad(opt)
        model.backward(loss)
        model.optimizer_step(opt)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.39, abs=0.1)  # about ln(4): an untrained start
    assert losses[-1] < 0.5 * losses[0]


def test_optimizer_settings_reach_the_optimizer():
    adamw = ImageClassifier(lr=3e-4, optimizer="AdamW", weight_decay=0.05).configure_optimizers()
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 3e-4 and adamw.param_groups[0]["weight_decay"] == 0.05
    sgd = ImageClassifier(lr=0.1, optimizer="sgd").configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_or_scheduler_fails_at_construction():
    with pytest.raises(ConfigError, match="unknown optimizer 'adan'; did you mean adam"):
        ImageClassifier(optimizer="adan")
    with pytest.raises(ConfigError, match="unknown scheduler 'cosin'; did you mean cosine"):
        ImageClassifier(scheduler="cosin")


def test_cosine_scheduler_config_spans_ten_epochs_without_a_trainer():
    config = ImageClassifier(scheduler="cosine", lr=0.1).configure_optimizers()
    assert set(config) == {"optimizer", "lr_scheduler"}
    assert set(config["lr_scheduler"]) == {"scheduler", "interval"}
    assert config["lr_scheduler"]["interval"] == "epoch"
    sched = config["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.T_max == 10 and sched.optimizer is config["optimizer"]
    for _ in range(10):
        config["optimizer"].step()
        sched.step()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cosine_scheduler_follows_the_trainers_max_epochs():
    model = ImageClassifier(scheduler="cosine")
    object.__setattr__(model, "_trainer", SimpleNamespace(max_epochs=3))
    assert model.configure_optimizers()["lr_scheduler"]["scheduler"].T_max == 3
    object.__setattr__(model, "_trainer", SimpleNamespace(max_epochs=-1))  # unbounded
    assert model.configure_optimizers()["lr_scheduler"]["scheduler"].T_max == 10


def test_validation_and_test_steps_return_the_loss_and_predict_returns_classes():
    model = ImageClassifier("mlp", num_classes=3, hidden=8).eval()
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        val = model.validation_step((x, y), 0)
        test = model.test_step((x, y), 0)
        expected = torch.nn.functional.cross_entropy(model(x), y)
        preds = model.predict_step((x, y), 0)
        preds_bare = model.predict_step(x, 0)
    assert val.item() == pytest.approx(expected.item()) == pytest.approx(test.item())
    assert preds.dtype == torch.long and preds.shape == (5,)
    assert torch.equal(preds, model(x).argmax(1)) and torch.equal(preds, preds_bare)


def test_steps_log_the_documented_metrics():
    model = ImageClassifier("mlp", num_classes=3, hidden=8)
    logged = []

    class Metrics:
        def log(self, name, value, **kwargs):
            logged.append((name, float(value), kwargs))

    object.__setattr__(model, "_trainer", SimpleNamespace(metrics=Metrics(), max_epochs=1))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    model.training_step((x, y), 0)
    model.validation_step((x, y), 0)
    model.test_step((x, y), 0)
    flags = {name: kw for name, _, kw in logged}
    assert list(flags) == [
        "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
    ]
    assert flags["train_loss"]["prog_bar"] and flags["train_loss"]["on_step"]
    assert flags["train_loss"]["on_epoch"]
    assert flags["train_acc"]["on_step"] is False and flags["train_acc"]["on_epoch"]
    assert flags["val_loss"]["prog_bar"] and flags["val_acc"]["prog_bar"]
    assert all(kw["batch_size"] == 4 for kw in flags.values())
    accs = [value for name, value, _ in logged if name.endswith("_acc")]
    assert all(0.0 <= a <= 1.0 for a in accs)
