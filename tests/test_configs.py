"""Every config in ``configs/`` (and the test pair's, ``tests/pair/toy.yaml``) replayed through the CLI
on tiny data: fit, then test and predict from the checkpoint alone, with no warning. A new config
needs a tiny-data builder in ``tests/helpers/data.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import CONFIGS, ROOT, data_class, run_cli
from tests.helpers.data import TINY_DATA, quiet
from tests.helpers.serving import CONFIG_NAMES, tiny_checkpoint, tiny_predictions
from tests.pair import CONFIG as PAIR_CONFIG

pytestmark = pytest.mark.slow

REPLAYED = [*CONFIGS, PAIR_CONFIG]


def _callbacks(config: Path) -> int:
    return len(yaml.safe_load(config.read_text())["trainer"].get("callbacks") or [])


# fast_dev_run once per DataModule, on its config with the most callbacks: what must not be written
# (logs, checkpoints, caches it was not told to use) is the Trainer's, its callbacks' and the
# DataModule's; configs sharing a DataModule differ otherwise in the network, which writes nothing.
ONE_PER_DATA = [
    max((c for c in REPLAYED if data_class(c) == name), key=_callbacks)
    for name in dict.fromkeys(map(data_class, REPLAYED))
]


def _shared(config: Path) -> bool:
    """A shipped config whose tiny checkpoint export and serve use too (``tests/helpers/serving.py``)."""
    return config.parent == ROOT / "configs" and config.stem in CONFIG_NAMES


@pytest.mark.parametrize("config", REPLAYED, ids=[c.stem for c in REPLAYED])
def test_every_config_fits_then_tests_and_predicts_from_its_checkpoint(
    config: Path, tmp_path: Path, runs_root: Path
):
    name = data_class(config)
    assert name in TINY_DATA, f"register a tiny-data builder for {name} in tests/helpers/data.py"
    if _shared(config):
        # The session's fit of this config on tiny data (`python -m src.cli fit --config ...`, 2 epochs),
        # fitted once for this module, export and serve; the test writes its run here.
        ckpt = tiny_checkpoint(config.stem, runs_root)
        where = [f"--trainer.logger.init_args.save_dir={tmp_path / 'checked'}"]
        first = 0
    else:
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
        where, first = [], 1  # the checkpoint alone: its runs go beside the fit's (version_1, version_2)
    tested = run_cli("test", "--ckpt_path", str(ckpt), *where, cwd=tmp_path)
    assert "test_acc" in tested.stdout
    task = (tmp_path / "checked" / ckpt.parents[2].name) if where else ckpt.parents[2]
    assert (task / f"version_{first}" / "per_class_report.json").is_file()
    if _shared(config):  # run once in the session: tests/test_serve.py compares the server with it
        predictions, predict_stderr = tiny_predictions(config.stem, runs_root)
    else:
        predict_stderr = run_cli("predict", "--ckpt_path", str(ckpt), cwd=tmp_path).stderr
        predictions = task / f"version_{first + 1}" / "predictions.csv"
    assert predictions.is_file()
    for said in (tested.stderr, predict_stderr):  # the checkpoint holds every setting: nothing to warn about
        assert "Warning" not in said and "linked" not in said, said[-2000:]


@pytest.mark.parametrize("config", ONE_PER_DATA, ids=[c.stem for c in ONE_PER_DATA])
def test_fast_dev_run_writes_nothing(config: Path, tmp_path: Path):
    data = TINY_DATA[data_class(config)](tmp_path)
    before = set(tmp_path.iterdir())
    out = run_cli("fit", "--config", str(config), "--trainer.fast_dev_run=true", *data, cwd=tmp_path)
    assert "Traceback" not in out.stderr
    written = {p.name for p in set(tmp_path.iterdir()) - before}
    assert written <= {"cache", "hf"}, written  # only the data caches it was told to use
