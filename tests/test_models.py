"""The networks: shapes, the batch-norm switches every BN model takes, and that each one learns."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import src.models
from src.callbacks.activation_stats import collect_activation_stats
from src.models import BNCNN, BNClassifier, ClassifierModule, MLPBNDropout, ResidualBN
from tests.helpers.cli import CONFIGS
from tests.pair import CONFIG as PAIR_CONFIG
from tests.pair.toy_model import ToyMLP

BN_OPTIONS = ("batch_norm", "bn_position", "bn_momentum", "bn_eps")
MODELS = [
    cls
    for cls in vars(src.models).values()
    if inspect.isclass(cls)
    and issubclass(cls, ClassifierModule)
    and cls not in (ClassifierModule, BNClassifier)
] + [ToyMLP]  # the test pair's model, named by its import path (not registered in src.models)
# Small instances of each model, with an input batch of its kind.
SMALL: dict[type, tuple[dict[str, Any], Any]] = {
    ResidualBN: ({"input_size": 40, "hidden_size": 16, "num_blocks": 2}, lambda: torch.randn(32, 40)),
    MLPBNDropout: ({"input_size": 784, "hidden_sizes": [32, 16]}, lambda: torch.randn(32, 28, 28)),
    BNCNN: (
        {"input_size": 50, "embedding_dim": 8, "kernel_sizes": [1, 3], "num_filters": 6, "hidden_size": 8},
        lambda: torch.randint(2, 50, (32, 12)),
    ),
    ToyMLP: ({"input_size": 6, "hidden_size": 64, "dropout": 0.0}, lambda: torch.randn(32, 6)),
}


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def small(model: type, **kwargs: Any) -> tuple[ClassifierModule, torch.Tensor]:
    args, batch = SMALL[model]
    return model(num_classes=4, **{**args, **kwargs}), batch()


def test_every_model_is_covered_here():
    assert set(MODELS) <= set(SMALL), f"add a small instance of {set(MODELS) - set(SMALL)} to SMALL"


# ---------------------------------------------------------------------------------- batch-norm options
@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_every_bn_model_takes_the_batch_norm_options_documented_once(model: type):
    assert issubclass(model, BNClassifier), f"{model.__name__} has batch norm: subclass BNClassifier"
    own = inspect.signature(model.__init__).parameters
    assert not set(BN_OPTIONS) & set(own), "declare the BN options once, in BNClassifier"
    assert all(f"{p}:" in (BNClassifier.__doc__ or "") for p in BN_OPTIONS)


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_batch_norm_can_be_switched_off_and_moved(model: type):
    on, x = small(model)
    off, _ = small(model, batch_norm=False)
    after, _ = small(model, bn_position="after_activation")
    assert bn_layers(on) and not bn_layers(off)
    assert on(x).shape == off(x).shape == after(x).shape == (32, 4)
    block = next(m for m in after.modules() if type(m).__name__ == "NormAct")
    assert isinstance(block[0], nn.ReLU) and isinstance(block[1], nn.BatchNorm1d)


@pytest.mark.parametrize("config", [*CONFIGS, PAIR_CONFIG], ids=[c.stem for c in [*CONFIGS, PAIR_CONFIG]])
def test_every_config_shows_the_batch_norm_options(config):
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert all(p in init_args for p in BN_OPTIONS), f"{config.name} lacks {set(BN_OPTIONS) - set(init_args)}"


class LogisticRegression(ClassifierModule):
    """A model without batch norm: one linear layer on flattened inputs."""

    def build_network(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(self.hparams.input_size, self.hparams.num_classes))


def test_a_model_without_batch_norm_takes_no_bn_options():
    model = LogisticRegression(num_classes=3, input_size=5)
    assert not set(BN_OPTIONS) & set(model.hparams)
    assert model(torch.randn(4, 5)).shape == (4, 3)


# ---------------------------------------------------------------------------------- networks
def test_residual_mlp_shapes_and_parameter_count():
    model = ResidualBN(num_classes=10, input_size=40, hidden_size=100, num_blocks=5)
    assert model(torch.randn(8, 40)).shape == (8, 10)
    linear = lambda i, o: i * o + o  # noqa: E731
    expected = linear(40, 100) + 5 * (linear(100, 100) + 2 * 100) + linear(100, 10)
    assert sum(p.numel() for p in model.net.parameters()) == expected
    assert len(bn_layers(model)) == 5


def test_residual_conv_blocks_keep_the_length_and_drop_the_bias_before_bn():
    model = ResidualBN(num_classes=10, input_size=40, hidden_size=16, num_blocks=3, block="conv")
    net = model.net
    assert model(torch.randn(8, 40)).shape == (8, 10)
    assert net.blocks(net.stem(torch.randn(8, 40))).shape == (8, 16, 40)
    conv = net.blocks[0].branch[0]
    assert isinstance(conv, nn.Conv1d) and conv.kernel_size == (5,) and conv.bias is None  # BN cancels it
    off = ResidualBN(num_classes=10, input_size=40, hidden_size=16, block="conv", batch_norm=False)
    assert off.net.blocks[0].branch[0].bias is not None


def test_residual_blocks_are_tracked_as_residual_streams():
    model = ResidualBN(num_classes=10, input_size=40, hidden_size=16, num_blocks=2, block="conv")
    stats = collect_activation_stats(model.net, torch.randn(32, 40))
    assert {"blocks.0", "blocks.1", "blocks.0.branch.1"} <= set(stats)


def test_mlp_layers_follow_the_hidden_sizes():
    model = MLPBNDropout(num_classes=10, input_size=784, hidden_sizes=[64, 32], dropout=0.2)
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    assert [m.p for m in model.net.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_every_model_overfits_one_fixed_batch(model: type):
    torch.manual_seed(0)
    net, x = small(model, lr=1e-2)
    if model is BNCNN:
        net = BNCNN(num_classes=4, **{**SMALL[BNCNN][0], "dropout": 0.0})
    y = torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_compile_model_compiles_in_place_and_keeps_checkpoint_keys():
    model = ResidualBN(num_classes=4, input_size=40, hidden_size=16, num_blocks=2, compile_model=True)
    keys = set(model.state_dict())
    model.configure_model()
    model.configure_model()  # Lightning may call it again (fit then test): compiled once
    assert set(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


def test_hyperparameters_are_plain_values_a_weights_only_checkpoint_can_hold(tmp_path):
    from src.runtime.value_types import PositiveFloat, PositiveInt

    model = ResidualBN(num_classes=4, input_size=40, hidden_size=PositiveInt(16), lr=PositiveFloat(0.1))
    torch.save({"hparams": dict(model.hparams)}, tmp_path / "h.pt")
    assert torch.load(tmp_path / "h.pt", weights_only=True)["hparams"]["hidden_size"] == 16
    assert type(model.lr) is float
