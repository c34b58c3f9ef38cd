"""The logger presets (``configs/presets/{csv,mlflow,wandb}.yaml``) beside TensorBoard and instead of it,
through the CLI, read back through each logger's own library: one run folder (config.yaml,
checkpoints, summary.json), a stopped run resumed, a checkpoint-only test, the settings and metrics.

The presets are stacked (``logger+=``), and :mod:`src.runtime.loggers` places each logger of the list
in turn, so one run with all of them checks each: all three beside TensorBoard; instead of it, CSV
(the run folder is its own ``csv/version_N``) and MLflow with W&B (neither has a run folder of its
own: ``lightning_logs/version_N``)."""

from __future__ import annotations

import csv
import importlib.util
import json
import signal
from pathlib import Path

import pytest
import yaml

from src.runtime.summary import read_summary
from tests.helpers.cli import ROOT, config, run_cli
from tests.helpers.data import tiny_mnist1d

pytestmark = pytest.mark.slow

PACKAGE = {"csv": None, "mlflow": "mlflow", "wandb": "wandb"}
LOGS = "lightning_logs"  # the presets' and the pair config's save_dir, under the working directory
SHIPPED_LR = yaml.safe_load(Path(config("mnist1d_resnet_bn")).read_text())["model"]["init_args"]["lr"]


def installed(*presets: str) -> list[str]:
    """The ``presets`` whose package is installed; a test of none of them is skipped."""
    found = [p for p in presets if not PACKAGE[p] or importlib.util.find_spec(PACKAGE[p]) is not None]
    if not found:
        pytest.skip(f"the {'/'.join(presets)} presets need their packages: pip install -e '.[loggers]'")
    return found


def fit(root: Path, presets: list[str], *extra: str) -> list[str]:
    stacked = [a for p in presets for a in ("--config", str(ROOT / "configs" / "presets" / f"{p}.yaml"))]
    return [
        "fit", "--config", config("mnist1d_resnet_bn"), *extra, *stacked,
        *tiny_mnist1d(root), "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2", "--test_after_fit=true",
    ]  # fmt: skip


# SIGTERM: the run saves last.ckpt where it stops (a SIGKILL may come before the epoch's checkpoint is on disk)
STOP = ["--trainer.callbacks+=tests.helpers.faults.KillAt", "--trainer.callbacks.step=15",
        f"--trainer.callbacks.signum={int(signal.SIGTERM)}"]  # fmt: skip


def assert_run_folder(run: Path, epochs: int = 2) -> dict:
    """The run folder holds the run's config, checkpoints and summary, whatever its loggers."""
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    summary = read_summary(run)
    assert [e["epoch"] for e in summary["epochs"]] == list(range(epochs)), summary
    assert "best" in summary and "test_acc" in summary["test"]
    return summary


def best_checkpoint(run: Path, summary: dict) -> Path:
    [best] = (run / "checkpoints").glob(f"epoch{summary['best']['epoch']:03d}-*.ckpt")
    return best


def mlflow_runs(root: Path) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / LOGS / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bn-classifiers")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def check_mlflow(root: Path, run: Path, name: str, summary: dict) -> None:
    """MLflow's own API lists the run with its settings, its val_acc history, its best and test
    figures and the best checkpoint as an artifact."""
    client, runs = mlflow_runs(root)
    assert name in runs, list(runs)  # one MLflow run per run folder, a resumed one included
    found = runs[name]
    assert found.data.tags["run_folder"] == str(run.resolve())
    assert float(found.data.params["lr"]) == SHIPPED_LR and found.data.params["model"] == "ResidualBN"
    history = [m.value for m in client.get_metric_history(found.info.run_id, "val_acc")]
    assert history == pytest.approx([e["val_acc"] for e in summary["epochs"]], abs=1e-6)
    assert found.data.metrics["hp/best_val_acc"] == pytest.approx(summary["best"]["value"], abs=1e-6)
    assert found.data.metrics["hp/test_acc"] == pytest.approx(summary["test"]["test_acc"], abs=1e-6)
    best = best_checkpoint(run, summary)
    assert f"{best.stem}/{best.name}" in [a.path for a in client.list_artifacts(found.info.run_id, best.stem)]


def check_csv(root: Path, run: Path, name: str, summary: dict) -> None:
    with (run / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_acc")]
    # every epoch once: the rows before the kill kept, none doubled by the resumed run
    assert [float(r["val_acc"]) for r in rows] == pytest.approx([e["val_acc"] for e in summary["epochs"]])


def check_wandb(root: Path, run: Path, name: str, summary: dict) -> None:
    ids = json.loads((run / "logger_runs.json").read_text())
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert offline and all(d.name.endswith(f"-{ids['WandbLogger']}") for d in offline), offline
    assert all((d / f"run-{ids['WandbLogger']}.wandb").stat().st_size > 0 for d in offline)


CHECK = {"csv": check_csv, "mlflow": check_mlflow, "wandb": check_wandb}


def test_beside_tensorboard_in_the_run_folder_and_from_a_checkpoint(tmp_path: Path):
    presets = installed("csv", "mlflow", "wandb")
    run_cli(*fit(tmp_path, presets), cwd=tmp_path)
    runs = tmp_path / LOGS / "mnist1d_resnet_bn"
    run = runs / "version_0"
    summary = assert_run_folder(run)
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard's files beside the other loggers'
    for preset in presets:
        CHECK[preset](tmp_path, run, "mnist1d_resnet_bn/version_0", summary)
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("mlruns", "wandb", "csv")]

    # a checkpoint-only test logs through the same loggers into a run folder of its own
    out = run_cli("test", "--ckpt_path", str(best_checkpoint(run, summary)), cwd=tmp_path)
    assert "Traceback" not in out.stderr
    tested = read_summary(runs / "version_1")
    assert tested["test"]["test_acc"] == pytest.approx(summary["test"]["test_acc"], abs=1e-6)
    if "mlflow" in presets:
        _, found = mlflow_runs(tmp_path)
        assert found["mnist1d_resnet_bn/version_1"].data.metrics["test_acc"] == pytest.approx(
            tested["test"]["test_acc"], abs=1e-6
        )
    if "wandb" in presets:
        assert list((runs / "version_1" / "wandb").glob("offline-run-*"))
    assert (runs / "version_1" / "metrics.csv").is_file()


@pytest.mark.parametrize("presets", [["csv"], ["mlflow", "wandb"]], ids=["csv", "mlflow+wandb"])
def test_instead_of_tensorboard_a_stopped_run_resumes_in_its_folder(presets: list[str], tmp_path: Path):
    presets = installed(*presets)
    args = fit(tmp_path, presets, "--trainer.logger=null")
    stopped = run_cli(*args, *STOP, cwd=tmp_path, check=False)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    run_cli(*args, "--ckpt_path=last", cwd=tmp_path)
    # CSV keeps its own layout; without a TensorBoard/CSV logger the run folder is lightning_logs/version_N
    runs = tmp_path / LOGS / ("csv" if presets == ["csv"] else "")
    assert [p.name for p in runs.glob("version_*")] == ["version_0"]
    run = runs / "version_0"
    summary = assert_run_folder(run)
    assert not list(run.glob("events.out.tfevents.*"))
    name = "lightning_logs/version_0"
    for preset in presets:
        CHECK[preset](tmp_path, run, name, summary)
    if "mlflow" in presets:
        _, found = mlflow_runs(tmp_path)
        assert list(found) == [name] and found[name].info.status == "FINISHED"  # the same run, continued
