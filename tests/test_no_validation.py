"""A final fit on every training sample (``val_size=0``), and the averaged weights a test scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.callbacks import EMAWeights
from src.data import ClassificationDataModule, DataError
from src.data.ag_news import AGNews
from src.data.mnist1d import MNIST1D
from src.models.bn_cnn import BNCNN
from tests.helpers.cli import config, refused, run_cli
from tests.helpers.data import tiny_mnist1d, write_tiny_ag_news
from tests.helpers.models import quiet_trainer

AG_NEWS = config("ag_news_cnn_bn")
MNIST1D_CONFIG = config("mnist1d_resnet_bn")


def _ag_news(tmp_path: Path, **kw) -> AGNews:
    files = write_tiny_ag_news(tmp_path / "data")
    return AGNews(data_files=files, cache_dir=str(tmp_path / "cache"), batch_size=16, **kw)


def test_val_size_zero_trains_on_every_training_row(tmp_path: Path):
    dm = _ag_news(tmp_path, val_size=0)
    dm.setup("fit")
    assert "val" not in dm.splits
    assert len(dm.splits["train"][0]) == 96  # every row of the tiny training file
    assert dm.val_dataloader() == []  # Lightning skips validation
    carved = _ag_news(tmp_path / "carved", val_size=16)
    carved.setup("fit")
    assert len(carved.splits["train"][0]) == 80 and len(carved.splits["val"][0]) == 16
    # the vocabulary is fitted on what is trained on, so the two differ in their cache entries
    assert dm.vocab_cache_file() != carved.vocab_cache_file()


class _SourceWithValidation(ClassificationDataModule):
    """A data source that brings its own validation split."""

    num_classes = 2
    input_size = 3

    def load_splits(self) -> dict:
        def split(n: int) -> tuple:
            return torch.randn(n, 3), torch.arange(n) % 2

        return {"train": split(20), "val": split(6), "test": split(8)}


def test_val_size_zero_drops_even_the_sources_own_validation_split():
    own = _SourceWithValidation(val_size=0.25)
    own.setup("fit")
    assert len(own.splits["val"][0]) == 6 and len(own.splits["train"][0]) == 20  # the source's, not carved
    none = _SourceWithValidation(val_size=0)
    none.setup("fit")
    assert "val" not in none.splits and len(none.splits["train"][0]) == 20


@pytest.mark.parametrize("val_size", [-1, 1.0, 2.5])
def test_val_size_out_of_range_is_refused(tmp_path: Path, val_size: float):
    with pytest.raises(DataError, match="val_size must be 0"):
        MNIST1D(cache_dir=str(tmp_path), val_size=val_size)


@pytest.mark.slow
def test_final_fit_without_validation_keeps_the_last_epoch_and_tests_it(tmp_path: Path):
    files = write_tiny_ag_news(tmp_path / "data")
    out = run_cli(
        "fit",
        "--config",
        AG_NEWS,
        f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.batch_size=16",
        "--data.init_args.val_size=0",
        "--trainer.max_epochs=2",
        "--test_after_fit=true",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    text = out.stdout + out.stderr
    assert "val_size=0: training on every training sample without validation" in text
    assert "EarlyStopping(monitor='val_loss') is off" in text
    assert "Total length of `list`" not in text  # Lightning's notice about the empty val loader
    ckpts = sorted(p.name for p in (tmp_path / "logs").rglob("*.ckpt"))
    assert ckpts == ["epoch001.ckpt", "last.ckpt"]  # the end of the schedule, not an early epoch
    last = torch.load(next((tmp_path / "logs").rglob("last.ckpt")), weights_only=True)
    assert last["epoch"] == 1  # written at every epoch end without validation too
    assert "test_acc" in text


@pytest.mark.parametrize(
    ("subcommand", "extra", "message"),
    [
        (
            "fit",
            [
                "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
                "--trainer.max_epochs=1",
            ],
            "ReduceLROnPlateau follows val_loss",
        ),
        ("validate", [], "no validation split to validate on"),
    ],
    ids=["plateau_schedule", "validate"],
)
@pytest.mark.slow
def test_what_needs_validation_is_a_clear_error_without_it(
    tmp_path: Path, subcommand: str, extra: list[str], message: str
):
    out = run_cli(
        subcommand,
        "--config",
        MNIST1D_CONFIG,
        *tiny_mnist1d(tmp_path),
        "--data.init_args.val_size=0",
        *extra,
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
        check=False,
    )
    refused(out, message)


def test_test_after_fit_scores_the_averaged_weights_of_the_checkpoint(tmp_path: Path):
    dm = _ag_news(tmp_path, val_size=16)
    model = BNCNN(input_size=dm.input_size, num_classes=4, kernel_sizes=[1, 2], num_filters=8, hidden_size=8)
    model.hparams.lr = model.lr = 0.01
    trainer = quiet_trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[EMAWeights(decay=0.5), ModelCheckpoint(monitor="val_acc", mode="max")],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in averaged.items() if v.is_floating_point())
    model.net.vectors.embedding.weight.data.zero_()  # whatever the model holds now is replaced by the test
    trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in averaged.items())
