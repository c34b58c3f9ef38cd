"""Fashion-MNIST DataModule and the MLP-BN-dropout model, on tiny parquet files in the Hub schema."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import src.data.fashion_mnist as fm
from src.data.fashion_mnist import CLASS_NAMES, FashionMNIST, pixel_stats
from src.data.hub import DataSourceError
from src.models.layers import NormAct
from src.models.mlp_bn_dropout import MLPBNDropout, MLPBNDropoutNet
from tests.conftest import ROOT, run_cli

CONFIG = str(ROOT / "configs" / "fashion_mnist_mlp_bn.yaml")
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})


def write_fashion(path: Path, n: int, seed: int = 0, size: int = 28, brightness: bool = True) -> Path:
    """``n`` random images (each with its own brightness, so subsets differ in mean) as Hub parquet."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 1.0, (n, 1, 1)) if brightness else np.ones((n, 1, 1))
    images = (rng.uniform(0, 255, (n, size, size)) * scale).astype(np.uint8)
    labels = [i % 10 for i in range(n)]
    datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=FEATURES).to_parquet(
        str(path)
    )
    return path


def tiny_fashion_dir(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    folder = root / "fashion"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        write_fashion(folder / "train.parquet", n_train, seed=0)
        write_fashion(folder / "test.parquet", n_test, seed=1)
    return folder


def tiny_fashion(tmp_path: Path) -> list[str]:
    """CLI flags pointing the Fashion-MNIST config at tiny data (used by tests/test_cli.py)."""
    return [
        f"--data.init_args.data_dir={tiny_fashion_dir(tmp_path)}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        f"--data.init_args.hf_cache_dir={tmp_path / 'hf'}",
        "--data.init_args.val_size=10",
        "--data.init_args.batch_size=16",
    ]


def make_dm(tmp_path: Path, **kwargs) -> FashionMNIST:
    if "data_dir" not in kwargs:
        kwargs["data_dir"] = str(tiny_fashion_dir(tmp_path))
    return FashionMNIST(
        cache_dir=str(tmp_path / "cache"),
        hf_cache_dir=str(tmp_path / "hf"),
        val_size=10,
        batch_size=16,
        **kwargs,
    )


def test_loads_from_data_dir_with_shapes_dtypes_and_split_sizes(tmp_path: Path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    sizes = {k: len(v[0]) for k, v in dm.splits.items()}
    assert sizes == {"train": 50, "val": 10, "test": 20}
    x, y = dm.splits["train"]
    assert x.dtype == torch.uint8 and x.shape[1:] == (28, 28) and y.dtype == torch.long
    assert dm.class_names == CLASS_NAMES and dm.num_classes == 10 and dm.input_size == 784
    xb, yb = next(iter(dm.train_dataloader()))
    xn, _ = dm.on_after_batch_transfer((xb, yb), 0)
    assert xn.dtype == torch.float32 and xn.shape == (16, 28, 28)


def test_loads_from_data_files_with_a_validation_file(tmp_path: Path):
    folder = tiny_fashion_dir(tmp_path)
    val = write_fashion(tmp_path / "dev.parquet", 7, seed=3)
    files = {
        "train": str(folder / "train.parquet"),
        "test": str(folder / "test.parquet"),
        "validation": str(val),
    }
    dm = make_dm(tmp_path, data_dir=None, data_files=files)
    dm.setup("fit")
    # a validation file is used as it is: nothing is carved from train
    assert {k: len(v[0]) for k, v in dm.splits.items()} == {"train": 60, "val": 7, "test": 20}


def test_normalisation_statistics_come_from_the_training_part_only(tmp_path: Path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    train_x, val_x = dm.splits["train"][0], dm.splits["val"][0]
    assert (dm.mean, dm.std) == pytest.approx(pixel_stats(train_x))
    # with the validation images included the figures differ (the images vary in brightness)
    assert dm.mean != pytest.approx(pixel_stats(torch.cat([train_x, val_x]))[0], rel=1e-4)
    xn = dm.transform_batch((train_x, dm.splits["train"][1]), training=True)[0]
    assert float(xn.mean()) == pytest.approx(0.0, abs=1e-5) and float(xn.std()) == pytest.approx(
        1.0, abs=1e-4
    )


def test_decoded_cache_is_reused_and_follows_the_files(tmp_path: Path, monkeypatch):
    make_dm(tmp_path).setup()
    caches = list((tmp_path / "cache").glob("*.pt"))
    assert len(caches) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(fm, "decode_images", no_decoding)
    make_dm(tmp_path).setup()
    monkeypatch.undo()
    # different test file → different key → a new cache
    write_fashion(tmp_path / "fashion" / "test.parquet", 12, seed=5)
    dm = make_dm(tmp_path)
    dm.setup()
    assert len(dm.splits["test"][0]) == 12 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_checkpoint_state_restores_names_and_statistics_without_the_data(tmp_path: Path):
    dm = make_dm(tmp_path)
    dm.setup()
    state = dm.state_dict()
    assert state["class_names"] == CLASS_NAMES and {"mean", "std", "source_key"} <= set(state)
    shutil.rmtree(tmp_path / "fashion")
    restored = make_dm(tmp_path, data_dir=str(tmp_path / "fashion"))
    restored.load_state_dict(state)
    assert restored.class_names == CLASS_NAMES
    with pytest.warns(UserWarning, match="decoded cache"):
        restored.setup("test")
    assert (restored.mean, restored.std) == (dm.mean, dm.std)
    assert torch.equal(restored.splits["test"][0], dm.splits["test"][0])


def test_missing_folder_and_missing_split_give_clear_errors(tmp_path: Path):
    with pytest.raises(DataSourceError, match="is not a folder"):
        make_dm(tmp_path, data_dir=str(tmp_path / "nowhere")).setup()
    (tiny_fashion_dir(tmp_path) / "test.parquet").unlink()
    with pytest.raises(DataSourceError, match=r"no test\.parquet"):
        make_dm(tmp_path).setup()


def test_wrong_columns_give_a_clear_error(tmp_path: Path):
    d = tmp_path / "wrong"
    d.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"pixels": [[0] * 784] * 4, "label": [0, 1, 2, 3]}).to_parquet(
            str(d / f"{split}.parquet")
        )
    with pytest.raises(DataSourceError, match=r"missing \['image'\]"):
        make_dm(tmp_path, data_dir=str(d)).setup()


def test_wrong_image_size_gives_a_clear_error(tmp_path: Path):
    d = tmp_path / "big"
    d.mkdir()
    write_fashion(d / "train.parquet", 20, size=32)
    write_fashion(d / "test.parquet", 5)
    with pytest.raises(DataSourceError, match="32×32, not 28×28"):
        make_dm(tmp_path, data_dir=str(d)).setup()


def test_augmentation_is_off_by_default_and_train_only(tmp_path: Path):
    dm = make_dm(tmp_path)
    dm.setup()
    batch = dm.splits["train"]
    assert torch.equal(
        dm.transform_batch(batch, training=True)[0], dm.transform_batch(batch, training=False)[0]
    )
    aug = make_dm(tmp_path, hflip=True, max_shift=2)
    aug.setup()
    assert not torch.equal(
        aug.transform_batch(batch, training=True)[0], aug.transform_batch(batch, training=False)[0]
    )
    assert torch.equal(
        aug.transform_batch(batch, training=False)[0], dm.transform_batch(batch, training=False)[0]
    )


@pytest.mark.parametrize("position", ["before_activation", "after_activation"])
def test_mlp_layers_follow_batch_norm_switches(position: str):
    net = MLPBNDropoutNet(784, 10, [32, 16], dropout=0.3, bn_position=position)
    kinds = [
        type(m).__name__ for block in net.hidden for m in (block if isinstance(block, NormAct) else [block])
    ]
    bn_act = ["BatchNorm1d", "ReLU"] if position == "before_activation" else ["ReLU", "BatchNorm1d"]
    assert kinds == ["Linear", *bn_act, "Dropout"] * 2
    assert net(torch.randn(5, 28, 28)).shape == (5, 10)
    plain = MLPBNDropoutNet(784, 10, [32, 16], batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    model = MLPBNDropout(hidden_sizes=[8], num_classes=10)
    assert model(torch.randn(3, 784)).shape == (3, 10)
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPBNDropoutNet(784, 10, [])


def test_cli_predict_from_checkpoint_reports_class_names_with_data_gone(tmp_path: Path):
    data = tiny_fashion(tmp_path)
    logs = [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    run_cli(
        "fit",
        "--config",
        CONFIG,
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        *data,
        *logs,
        cwd=tmp_path,
    )
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    shutil.rmtree(tmp_path / "fashion")  # the decoded cache (named by the checkpoint) is enough
    run_cli("predict", "--ckpt_path", str(ckpt), "--trainer.callbacks+=PredictionWriter", cwd=tmp_path)
    rows = list(csv.reader(next(tmp_path.rglob("predictions.csv")).open()))
    assert len(rows) == 21 and {r[2] for r in rows[1:]} <= set(CLASS_NAMES)


def test_cli_without_data_source_stops_fast_with_what_to_pass(tmp_path: Path):
    out = run_cli(
        "fit",
        "--config",
        CONFIG,
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        f"--data.init_args.hf_cache_dir={tmp_path / 'hf'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert out.returncode != 0
    assert "--data.init_args.data_dir=DIR" in out.stderr and "Traceback" not in out.stderr
