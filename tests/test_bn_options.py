"""Every model takes the same batch-norm options, and every config shows them."""

from __future__ import annotations

import inspect

import pytest
import yaml

import src.models
from src.models import ClassifierModule
from tests.conftest import CONFIGS

BN_OPTIONS = ("batch_norm", "bn_position", "bn_momentum", "bn_eps")
MODELS = [
    cls
    for cls in vars(src.models).values()
    if inspect.isclass(cls) and issubclass(cls, ClassifierModule) and cls is not ClassifierModule
]


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_every_model_takes_the_batch_norm_options(model: type):
    params = inspect.signature(model.__init__).parameters
    assert all(p in params for p in BN_OPTIONS), f"{model.__name__} lacks {set(BN_OPTIONS) - set(params)}"
    assert all(p in (model.__doc__ or "") for p in BN_OPTIONS), (
        "document them in the class docstring (--help)"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_shows_the_batch_norm_options(config):
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert all(p in init_args for p in BN_OPTIONS), f"{config.name} lacks {set(BN_OPTIONS) - set(init_args)}"
