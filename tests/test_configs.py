"""Every config in ``configs/`` (and the test pair's, ``tests/pair/toy.yaml``) replayed through the CLI
on tiny data: fit, then test and predict from the checkpoint alone, with no warning. A new config
needs a tiny-data builder in ``tests/helpers/data.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import CONFIGS, data_class, run_cli
from tests.helpers.data import TINY_DATA, quiet
from tests.pair import CONFIG as PAIR_CONFIG

pytestmark = pytest.mark.slow

REPLAYED = [*CONFIGS, PAIR_CONFIG]


@pytest.mark.parametrize("config", REPLAYED, ids=[c.stem for c in REPLAYED])
def test_every_config_fits_then_tests_and_predicts_from_its_checkpoint(config: Path, tmp_path: Path):
    name = data_class(config)
    assert name in TINY_DATA, f"register a tiny-data builder for {name} in tests/helpers/data.py"
    data = TINY_DATA[name](tmp_path)
    run_cli(
        "fit",
        "--config",
        str(config),
        "--trainer.limit_train_batches=2",
        *data,
        *quiet(tmp_path),
        cwd=tmp_path,
    )
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    tested = run_cli("test", "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert "test_acc" in tested.stdout
    predicted = run_cli("predict", "--ckpt_path", str(ckpt), cwd=tmp_path)
    for out in (tested, predicted):  # the checkpoint holds every setting: nothing to warn about
        assert "Warning" not in out.stderr and "linked" not in out.stderr, out.stderr[-2000:]
    task = ckpt.parents[2]
    assert (task / "version_1" / "per_class_report.json").is_file()
    assert (task / "version_2" / "predictions.csv").is_file()


@pytest.mark.parametrize("config", REPLAYED, ids=[c.stem for c in REPLAYED])
def test_fast_dev_run_writes_nothing(config: Path, tmp_path: Path):
    data = TINY_DATA[data_class(config)](tmp_path)
    before = set(tmp_path.iterdir())
    out = run_cli("fit", "--config", str(config), "--trainer.fast_dev_run=true", *data, cwd=tmp_path)
    assert "Traceback" not in out.stderr
    written = {p.name for p in set(tmp_path.iterdir()) - before}
    assert written <= {"cache", "hf"}, written  # only the data caches it was told to use
