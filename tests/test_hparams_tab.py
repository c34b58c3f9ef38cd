"""TensorBoard's HPARAMS tab and curves, checked the way they are read: the real ``tensorboard`` server
queried over its HTTP API."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest

from tests.helpers.cli import config, run_cli
from tests.helpers.data import tiny_mnist1d
from tests.helpers.tensorboard import TensorBoard

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
SETTINGS_SHOWN = ("model", "optimizer", "lr", "lr_scheduler", "data/batch_size", "trainer/max_epochs", "seed",
                  "trainer/precision", "trainer/processes", "batch_norm")  # fmt: skip


def fit(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", MNIST1D, *tiny_mnist1d(root), f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        "--trainer.enable_progress_bar=false", "--trainer.max_epochs=3", *extra,
    ]  # fmt: skip


def session_groups(tb: TensorBoard) -> dict[str, dict[str, float]]:
    body = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = tb.get("/data/plugin/hparams/session_groups", body)["sessionGroups"]
    return {
        g["name"]: {
            **{m["name"]["tag"]: float(m["value"]) for m in g["metricValues"]},
            **{f"param:{k}": v for k, v in g["hparams"].items()},
        }
        for g in groups
    }


def curve(tb: TensorBoard, run: str, tag: str) -> list[tuple[int, float]]:
    return [(step, value) for _, step, value in tb.get(f"/data/plugin/scalars/scalars?run={run}&tag={tag}")]


def assert_measured_points_only(tb: TensorBoard, run: str) -> None:
    """The hp/* curves hold measured values only: no placeholder point before the first validation."""
    first_validation = curve(tb, run, "val_acc")[0][0]
    for tag in ("hp/best_val_acc", "hp/test_acc", "hp/test_f1"):
        points = curve(tb, run, tag)
        assert points and all(math.isfinite(v) for _, v in points), (tag, points)
        assert min(step for step, _ in points) >= first_validation, (tag, points)


def test_hparams_tab_shows_runs_side_by_side_and_a_resumed_run_keeps_its_curves(tmp_path: Path):
    """Two runs of other learning rates, the first SIGKILLed in epoch 1 and resumed: the tab shows both
    runs' settings beside their best validation and test figures; the resumed run's curves and best
    validation accuracy are whole."""
    lr_a = ("--model.init_args.lr=0.01",)
    kill = ["--trainer.callbacks+=tests.helpers.faults.KillAt", "--trainer.callbacks.step=20",
            f"--trainer.callbacks.signum={int(signal.SIGKILL)}"]  # fmt: skip
    out = run_cli(*fit(tmp_path, *lr_a, "--test_after_fit=false"), *kill, cwd=tmp_path, check=False)
    assert out.returncode == -signal.SIGKILL
    run_cli(*fit(tmp_path, *lr_a, "--test_after_fit=true", "--ckpt_path=last"), cwd=tmp_path)
    run_cli(*fit(tmp_path, "--model.init_args.lr=0.003", "--test_after_fit=true"), cwd=tmp_path)
    with TensorBoard(tmp_path / "logs") as tb:
        experiment = tb.get("/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {
            "hp/best_val_acc",
            "hp/test_acc",
            "hp/test_f1",
        }
        shown = {h["name"] for h in experiment["hparamInfos"]}
        assert set(SETTINGS_SHOWN) <= shown, set(SETTINGS_SHOWN) - shown
        groups = session_groups(tb)
        assert len(groups) == 2 and {g["param:lr"] for g in groups.values()} == {0.01, 0.003}  # side by side
        for run, lr in (("mnist1d_resnet_bn/version_0", 0.01), ("mnist1d_resnet_bn/version_1", 0.003)):
            values = next(g for name, g in groups.items() if run in name)
            assert values["param:lr"] == lr
            val_acc = curve(tb, run, "val_acc")
            # the whole curve, one point per epoch, none lost or doubled by the resume
            assert [step for step, _ in val_acc] == [13, 27, 41], val_acc
            assert values["hp/best_val_acc"] == pytest.approx(max(v for _, v in val_acc))
            assert not math.isnan(values["hp/test_acc"]) and 0 < values["hp/test_f1"] <= 1
            assert_measured_points_only(tb, run)
