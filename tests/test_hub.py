"""Hugging Face loading shared by the Hub-backed DataModules: local parquet, offline behaviour, errors."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants

from src.data.hub import (
    DataSourceError,
    HubDataModule,
    files_identity,
    hub_reachable,
    load_hf_dataset,
    offline_mode,
    parquet_class_names,
)

NAMES = ["alpha", "beta", "gamma"]
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})


def write_split(path: Path, n: int, features: datasets.Features = FEATURES) -> Path:
    rows = {"text": [f"row {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}
    if "label" not in features:
        rows.pop("label")
        rows["category"] = [i % 3 for i in range(n)]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_split(d / "train.parquet", 12)
    write_split(d / "test.parquet", 6)
    return d


def test_loads_from_data_dir_with_class_names(folder: Path, tmp_path: Path):
    ds = load_hf_dataset(
        "nobody/none", data_dir=folder, cache_dir=str(tmp_path / "hf"), columns=("text", "label")
    )
    assert sorted(ds) == ["test", "train"]
    assert (ds["train"].num_rows, ds["test"].num_rows) == (12, 6)
    assert ds["train"].features["label"].names == NAMES
    assert parquet_class_names(folder / "train.parquet") == NAMES


def test_data_dir_picks_up_an_optional_validation_file(folder: Path, tmp_path: Path):
    write_split(folder / "validation.parquet", 3)
    ds = load_hf_dataset("nobody/none", data_dir=folder, cache_dir=str(tmp_path / "hf"))
    assert ds["validation"].num_rows == 3


def test_loads_from_data_files(folder: Path, tmp_path: Path):
    other = write_split(tmp_path / "held_out.parquet", 4)
    files = {"train": str(folder / "train.parquet"), "test": str(other)}
    ds = load_hf_dataset("nobody/none", data_files=files, cache_dir=str(tmp_path / "hf"), columns=("text",))
    assert (ds["train"].num_rows, ds["test"].num_rows) == (12, 4)


def test_local_load_is_offline_and_restores_the_flags(folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        seen["offline"] = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    load_hf_dataset("nobody/none", data_dir=folder, cache_dir=str(tmp_path / "hf"))
    assert seen["offline"] == (True, True)
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == (False, False)
    with offline_mode():
        assert constants.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE


def test_missing_folder_says_what_to_pass(tmp_path: Path):
    with pytest.raises(DataSourceError, match="is not a folder.*train.parquet"):
        load_hf_dataset("nobody/none", data_dir=tmp_path / "nowhere")


def test_missing_split_file_is_named(folder: Path):
    (folder / "test.parquet").unlink()
    with pytest.raises(DataSourceError, match=r"no test\.parquet"):
        load_hf_dataset("nobody/none", data_dir=folder)


def test_data_files_errors(folder: Path, tmp_path: Path):
    with pytest.raises(DataSourceError, match="needs train and test"):
        load_hf_dataset("nobody/none", data_files={"train": str(folder / "train.parquet")})
    with pytest.raises(DataSourceError, match="does not know"):
        load_hf_dataset(
            "nobody/none",
            data_files={
                "train": str(folder / "train.parquet"),
                "test": str(folder / "test.parquet"),
                "dev": "x",
            },
        )
    with pytest.raises(DataSourceError, match="is not a file"):
        load_hf_dataset(
            "nobody/none",
            data_files={"train": str(folder / "train.parquet"), "test": str(tmp_path / "no.parquet")},
        )
    with pytest.raises(DataSourceError, match="not both"):
        load_hf_dataset("nobody/none", data_dir=folder, data_files={"train": "a", "test": "b"})


def test_wrong_columns_are_reported(tmp_path: Path):
    d = tmp_path / "bad"
    d.mkdir()
    wrong = datasets.Features({"text": datasets.Value("string"), "category": datasets.Value("int64")})
    write_split(d / "train.parquet", 6, wrong)
    write_split(d / "test.parquet", 6, wrong)
    with pytest.raises(DataSourceError, match=r"missing \['label'\]"):
        load_hf_dataset("nobody/none", data_dir=d, cache_dir=str(tmp_path / "hf"), columns=("text", "label"))


def test_not_parquet_is_reported(folder: Path, tmp_path: Path):
    (folder / "test.parquet").write_text("not parquet")
    with pytest.raises(DataSourceError, match="Could not read the parquet files"):
        load_hf_dataset("nobody/none", data_dir=folder, cache_dir=str(tmp_path / "hf"))


def test_unreachable_hub_fails_fast_with_a_hint(tmp_path: Path, monkeypatch):
    # With HF_HUB_OFFLINE=1 (set for the suite) and nothing cached: no retries, a clear message.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match=r"HF_HUB_OFFLINE.*--data.init_args.data_dir=DIR"):
        load_hf_dataset("nobody/not-cached", cache_dir=str(tmp_path / "hf"))
    # Without the switch, the probe finds no Hub (port 9 refuses) and the same happens.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert not hub_reachable(timeout=1.0)
    with pytest.raises(DataSourceError, match=r"cannot be reached.*data_files"):
        load_hf_dataset("nobody/not-cached", cache_dir=str(tmp_path / "hf"))
    assert time.perf_counter() - start < 15


def test_files_identity_follows_the_files(folder: Path):
    files = {"train": folder / "train.parquet", "test": folder / "test.parquet"}
    key = files_identity(files)
    assert key == files_identity(dict(files))
    write_split(folder / "test.parquet", 7)
    assert files_identity(files) != key


class TinyHub(HubDataModule):
    columns = ("text", "label")

    @property
    def num_classes(self) -> int:
        return 3


def test_datamodule_class_names_from_schema_and_checkpoint_state(folder: Path, tmp_path: Path):
    dm = TinyHub(hub_name="nobody/none", data_dir=str(folder), hf_cache_dir=str(tmp_path / "hf"))
    assert dm.class_names == NAMES  # from the parquet schema, before any loading
    state = dm.state_dict()
    assert state == {"class_names": NAMES}
    # a checkpoint restores them with the data gone
    gone = TinyHub(hub_name="nobody/none", data_dir=str(tmp_path / "gone"))
    gone.load_state_dict(state)
    assert gone.class_names == NAMES
    with pytest.raises(DataSourceError, match="not both"):
        TinyHub(hub_name="x", data_dir="a", data_files={"train": "a", "test": "b"})
