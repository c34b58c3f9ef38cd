"""Fashion-MNIST DataModule on tiny parquet files in the Hub schema, and the CLI on them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import datasets
import pytest
import torch

import src.data.fashion_mnist as fm
from src.data.fashion_mnist import CLASS_NAMES, FashionMNIST, pixel_stats
from src.data.hub import DataSourceError
from tests.helpers.cli import config, refused, run_cli
from tests.helpers.data import quiet, tiny_fashion, tiny_fashion_dir, write_fashion

CONFIG = config("fashion_mnist_mlp_bn")


def make_dm(tmp_path: Path, **kwargs) -> FashionMNIST:
    if "data_dir" not in kwargs:
        kwargs["data_dir"] = str(tiny_fashion_dir(tmp_path))
    args = {"cache_dir": str(tmp_path / "cache"), "hf_cache_dir": str(tmp_path / "hf"), "val_size": 10}
    return FashionMNIST(batch_size=16, **{**args, **kwargs})


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


def test_bad_images_and_labels_name_the_split_and_row(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = pq.read_table(write_fashion(tmp_path / "good.parquet", 4))
    cases = {
        "not_png": ("Image 2 of the train split is not a readable image",),
        "null_image": ("Image 2 of the train split is empty (null)",),
        "null_label": ("The label of row 2 of the train split is None, not a class index",),
        "string_labels": ("The label of row 0 of the train split is '0', not a class index",),
    }
    for name, (message,) in cases.items():
        images, labels = good.column("image").to_pylist(), good.column("label").to_pylist()
        if name == "not_png":
            images[2] = {"bytes": b"GIF89a not an image", "path": None}
        elif name == "null_image":
            images[2] = None
        elif name == "null_label":
            labels[2] = None
        else:
            labels = [str(v) for v in labels]
        d = tmp_path / name
        d.mkdir()
        for split in ("train", "test"):
            pq.write_table(pa.table({"image": images, "label": labels}), d / f"{split}.parquet")
        with pytest.raises(DataSourceError) as info:
            make_dm(tmp_path, data_dir=str(d), val_size=1).setup()
        assert message in str(info.value), (name, str(info.value))


@pytest.mark.slow
def test_cli_predict_from_checkpoint_reports_class_names_with_data_gone(tmp_path: Path):
    run_cli("fit", "--config", CONFIG, *tiny_fashion(tmp_path), *quiet(tmp_path), cwd=tmp_path)
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    shutil.rmtree(tmp_path / "fashion")  # the decoded cache (named by the checkpoint) is enough
    run_cli("predict", "--ckpt_path", str(ckpt), cwd=tmp_path)
    rows = list(csv.reader(next(tmp_path.rglob("predictions.csv")).open()))
    assert len(rows) == 21 and {r[2] for r in rows[1:]} <= set(CLASS_NAMES)


@pytest.mark.slow
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
    refused(out, "--data.init_args.data_dir=DIR")
    assert not list(tmp_path.rglob("version_*"))  # no empty run folder left behind
