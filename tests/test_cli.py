"""The real entry point, run as a user runs it (``python -m src.cli ...`` in a subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.ag_news_data import tiny_ag_news
from tests.conftest import CONFIGS, ROOT, run_cli
from tests.test_fashion_mnist import tiny_fashion

MNIST1D_CONFIG = str(ROOT / "configs" / "mnist1d_resnet_bn.yaml")


def tiny_mnist1d(tmp_path: Path) -> list[str]:
    return [
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
        "--data.init_args.batch_size=32",
    ]


def logs(tmp_path: Path) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]


# Tiny stand-ins for each DataModule's real data, keyed by the class name in the configs.
# A config whose data class is missing here fails loudly, so every new config gets replayed.
TINY_DATA = {"MNIST1D": tiny_mnist1d, "FashionMNIST": tiny_fashion, "AGNews": tiny_ag_news}


def register_tiny_data(name: str):
    def deco(fn):
        TINY_DATA[name] = fn
        return fn

    return deco


def _data_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_fits_tests_and_predicts(config: Path, tmp_path: Path):
    name = _data_class(config)
    assert name in TINY_DATA, f"add a tiny-data builder for {name} to TINY_DATA in tests/test_cli.py"
    data = TINY_DATA[name](tmp_path)
    run_cli(
        "fit", "--config", str(config), "--trainer.fast_dev_run=true", *data, *logs(tmp_path), cwd=tmp_path
    )
    # fast_dev_run writes no checkpoint: make a real one-epoch run, then test and predict from it.
    run_cli(
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        "--trainer.limit_train_batches=2",
        *data,
        *logs(tmp_path),
        cwd=tmp_path,
    )
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    out = run_cli(
        "test", "--config", str(config), "--ckpt_path", str(ckpt), *data, *logs(tmp_path), cwd=tmp_path
    )
    assert "test_acc" in out.stdout
    run_cli(
        "predict", "--config", str(config), "--ckpt_path", str(ckpt), *data, *logs(tmp_path), cwd=tmp_path
    )
    assert list((tmp_path / "logs").rglob("predictions.csv"))


def test_default_fit_leaves_logs_config_hparams_and_checkpoints(tmp_path: Path):
    out = run_cli(
        "fit",
        "--config",
        MNIST1D_CONFIG,
        "--trainer.max_epochs=2",
        *tiny_mnist1d(tmp_path),
        *logs(tmp_path),
        cwd=tmp_path,
    )
    assert "LightningCLI's args parameter" not in out.stderr  # no warning a user cannot act on
    run_dir = next((tmp_path / "logs").rglob("version_0"))
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(p.startswith("epoch") and "val_acc" in p for p in ckpts), ckpts
    # the saved config re-parses as it is; linked values are in hparams.yaml
    saved = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--print_config")
    assert yaml.safe_load(saved.stdout)["data"]["class_path"].endswith("MNIST1D")
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["num_classes"] == 10

    # test from the checkpoint alone: model and data come from it, no config repeated
    best = next(p for p in (run_dir / "checkpoints").glob("epoch*.ckpt"))
    out = run_cli("test", "--ckpt_path", str(best), cwd=tmp_path)
    assert "test_acc" in out.stdout

    # resume from last.ckpt for one more epoch
    last = run_dir / "checkpoints" / "last.ckpt"
    step_before = torch.load(last, weights_only=True)["global_step"]
    run_cli(
        "fit",
        "--config",
        MNIST1D_CONFIG,
        "--ckpt_path",
        str(last),
        "--trainer.max_epochs=3",
        *tiny_mnist1d(tmp_path),
        *logs(tmp_path),
        cwd=tmp_path,
    )
    resumed = max((tmp_path / "logs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(resumed, weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] > step_before


def test_print_config_reloads_as_a_config(tmp_path: Path):
    out = run_cli("fit", "--config", MNIST1D_CONFIG, "--model.init_args.hidden_size=64", "--print_config")
    cfg = tmp_path / "printed.yaml"
    cfg.write_text(out.stdout)
    assert yaml.safe_load(out.stdout)["model"]["init_args"]["hidden_size"] == 64
    again = run_cli("fit", "--config", str(cfg), "--print_config")
    assert yaml.safe_load(again.stdout) == yaml.safe_load(out.stdout)


def test_help_lists_model_and_data_options():
    out = run_cli("fit", "--config", MNIST1D_CONFIG, "--help")
    assert "--model" in out.stdout and "--data" in out.stdout and "--test_after_fit" in out.stdout


def test_wrong_key_and_wrong_type_give_clear_errors(tmp_path: Path):
    bad_key = run_cli("fit", "--config", MNIST1D_CONFIG, "--model.init_args.hiden_size=3", check=False)
    assert bad_key.returncode != 0 and "hiden_size" in bad_key.stderr
    bad_type = run_cli("fit", "--config", MNIST1D_CONFIG, "--model.init_args.hidden_size=wide", check=False)
    assert bad_type.returncode != 0 and "hidden_size" in bad_type.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer:\n  max_epoch: 3\n")
    bad_yaml = run_cli("fit", "--config", MNIST1D_CONFIG, "--config", str(cfg), check=False)
    assert bad_yaml.returncode != 0 and "max_epoch" in bad_yaml.stderr


def test_missing_or_corrupt_checkpoint_gives_clear_error(tmp_path: Path):
    missing = run_cli("test", "--ckpt_path", str(tmp_path / "nope.ckpt"), check=False)
    assert missing.returncode != 0 and "is not a file" in missing.stderr
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    corrupt = run_cli("test", "--ckpt_path", str(bad), check=False)
    assert corrupt.returncode != 0 and "corrupt" in corrupt.stderr
    assert bad.read_bytes() == b"garbage"  # nothing overwritten


def test_linked_value_in_config_warns(tmp_path: Path):
    out = run_cli(
        "fit",
        "--config",
        MNIST1D_CONFIG,
        "--model.init_args.num_classes=3",
        "--trainer.fast_dev_run=true",
        *tiny_mnist1d(tmp_path),
        *logs(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert "linked" in out.stderr
