"""The test pair (tests/pair/: toy blobs × ToyMLP, added as README's "Add your own pair" says) through
every command and tool, each run as a user runs it: fit; a SIGKILL mid-epoch, then a resume after the
data folder moved, itself killed before an epoch's save, and its resume; checkpoint-only test and predict
once the data folder is gone; ONNX export with parity; serving raw vectors over HTTP; a 2-trial
search and a 2-run ablation.

The pair touches nothing outside its data file, model file, config and tiny-data builder, so a step
failing here is a tool that does not yet take any new pair.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers.cli import ROOT, env, refused, run_cli, run_module, warnings_in
from tests.helpers.data import blob_center, tiny_toy_blobs
from tests.helpers.faults import assert_same_state
from tests.helpers.serving import cli_predictions
from tests.pair import CONFIG
from tests.pair.toy_data import CLASS_NAMES

pytestmark = pytest.mark.slow

EPOCHS = 3  # 7 steps each: 216 training vectors in batches of 32
CENTERS = [blob_center(label) for label in range(len(CLASS_NAMES))]
# Raw vectors for predict, export and serve: each blob's centre, then points between blobs.
RAW = CENTERS + [
    [(a + b) / 2 for a, b in zip(CENTERS[i], CENTERS[j], strict=True)] for i, j in ((0, 1), (1, 2))
]
PROB_ATOL = 2e-6  # predictions.csv rounds probabilities to 6 decimals


def fit_args(root: Path, save_dir: Path, *extra: str) -> list[str]:
    """A deterministic fit of the pair on the tiny blobs under ``root`` (``extra`` overrides them)."""
    return [
        "fit",
        "--config",
        str(CONFIG),
        *tiny_toy_blobs(root),
        "--seed_everything=7",
        "--trainer.deterministic=true",
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *extra,
    ]


def kill(step: int, where: str) -> list[str]:
    return [
        "--trainer.callbacks+=tests.helpers.faults.KillAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.where={where}",
    ]


def last_ckpt(save_dir: Path) -> Path:
    found = sorted(save_dir.rglob("last.ckpt"))
    assert len(found) == 1, f"expected one run with a last.ckpt under {save_dir}: {found}"
    return found[0]


def saved_step(save_dir: Path) -> int:
    """The step last.ckpt holds after a kill. A save's flush to disk finishes in the background, so
    the newest epoch's save may be lost; the one before it is complete once the next save began."""
    return torch.load(last_ckpt(save_dir), weights_only=True)["global_step"]


@dataclass
class Fitted:
    root: Path  # holds the tiny data in blobs/ (the fit read a copy of it, deleted since)
    ckpt: Path  # last.ckpt of the uninterrupted run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """One uninterrupted fit (then its test) of the pair, on a copy of the data deleted afterwards:
    the reference of the resume tests and the checkpoint-only steps' checkpoint."""
    root = tmp_path_factory.mktemp("pair")
    tiny_toy_blobs(root)
    copy = shutil.copytree(root / "blobs", root / "copy")
    run_cli(*fit_args(root, root / "logs", f"--data.init_args.data_root={copy}"), cwd=root)
    shutil.rmtree(copy)
    return Fitted(root, last_ckpt(root / "logs"))


@pytest.fixture(scope="module")
def predicted(fitted: Fitted, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """``python -m src.cli predict --ckpt_path`` on the raw vectors :data:`RAW` (its data folder gone)."""
    workdir = tmp_path_factory.mktemp("predicted")
    return cli_predictions(fitted.ckpt, workdir, f"--data.init_args.predict_inputs={json.dumps(RAW)}")


# ---------------------------------------------------------------------------------- fit
def test_fit_learns_the_blobs_and_keeps_the_fitted_normalisation_in_the_checkpoint(fitted: Fitted):
    run = fitted.ckpt.parents[1]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["class_path"] == "tests.pair.toy_data.ToyBlobs"
    assert saved["model"]["class_path"] == "tests.pair.toy_model.ToyMLP"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["epochs"]) == EPOCHS and summary["test"]["test_acc"] > 0.8  # tested after fit
    report = json.loads((run / "per_class_report.json").read_text())
    assert report["classes"] == list(CLASS_NAMES)

    state = torch.load(fitted.ckpt, weights_only=True)
    assert state["hyper_parameters"]["class_names"] == list(CLASS_NAMES)
    # per-feature statistics of the training part: close to those of the whole train.csv, whose
    # features span four orders of magnitude
    table = np.loadtxt(fitted.root / "blobs" / "train.csv", delimiter=",", skiprows=1)[:, :-1]
    mean, std = np.array(state["ToyBlobs"]["mean"]), np.array(state["ToyBlobs"]["std"])
    assert mean.shape == std.shape == (6,)
    np.testing.assert_array_less(np.abs(mean - table.mean(0)), 0.3 * table.std(0))
    np.testing.assert_allclose(std, table.std(0), rtol=0.2)


# ---------------------------------------------------------------------------------- kill and resume
def test_kills_mid_epoch_and_before_a_save_resume_to_the_uninterrupted_run_after_the_data_moved(
    fitted: Fitted, tmp_path: Path
):
    """One run killed twice and resumed twice: a SIGKILL mid-epoch; its resume, from a data folder
    moved in between, killed after the last epoch's validation, before its save; then the resume that
    finishes, in the state of the uninterrupted run."""
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(fitted.root / "blobs", before)
    args = fit_args(fitted.root, tmp_path / "logs")
    out = run_cli(
        *args, f"--data.init_args.data_root={before}", *kill(17, "batch_end"), cwd=tmp_path, check=False
    )  # in epoch 2
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert saved_step(tmp_path / "logs") in (7, 14)
    before.rename(after)
    moved = [f"--data.init_args.data_root={after}", "--ckpt_path=last"]
    out = run_cli(*args, *moved, *kill(21, "before_epoch_save"), cwd=tmp_path, check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert "Restored all states" in out.stdout + out.stderr
    assert saved_step(tmp_path / "logs") in (7, 14)
    out = run_cli(*args, *moved, cwd=tmp_path)
    assert "Restored all states" in out.stdout + out.stderr
    assert_same_state(fitted.ckpt, last_ckpt(tmp_path / "logs"))


# ---------------------------------------------------------------------------------- from the checkpoint alone
def test_checkpoint_only_test_names_the_missing_data_folder_and_runs_on_the_moved_one(
    fitted: Fitted, tmp_path: Path
):
    gone = run_cli("test", "--ckpt_path", str(fitted.ckpt), cwd=tmp_path, check=False)
    refused(gone, "train.csv", "--data.init_args.data_root=")
    moved = run_cli(
        "test",
        "--ckpt_path",
        str(fitted.ckpt),
        f"--data.init_args.data_root={fitted.root / 'blobs'}",
        cwd=tmp_path,
    )
    assert "test_acc" in moved.stdout and not warnings_in(moved.stderr), moved.stderr[-2000:]


def test_checkpoint_only_predict_classifies_raw_vectors_without_the_data(
    fitted: Fitted, predicted: list[dict]
):
    saved = yaml.safe_load((fitted.ckpt.parents[1] / "config.yaml").read_text())
    assert not Path(saved["data"]["init_args"]["data_root"]).exists()
    assert len(predicted) == len(RAW)
    assert [row["predicted"] for row in predicted[: len(CENTERS)]] == list(CLASS_NAMES)  # each centre's blob
    for row in predicted:
        assert list(row["probabilities"]) == list(CLASS_NAMES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------- export and serve
def test_onnx_export_passes_parity_and_gives_predicts_probabilities(
    fitted: Fitted, predicted: list[dict], tmp_path: Path
):
    ort = pytest.importorskip("onnxruntime", reason="the serve extra (onnxruntime) is not installed")
    out = tmp_path / "exported"
    proc = run_module(
        "src.tools.export", "--ckpt_path", str(fitted.ckpt), "--format", "onnx", "--output", str(out)
    )
    # the data folder is gone: parity on the DataModule's synthetic inputs
    assert "parity (onnxruntime" in proc.stdout and ": PASS" in proc.stdout, proc.stdout
    assert json.loads((out / "model.json").read_text(encoding="utf-8"))["parity"]["passed"]

    # the exported network on the vectors standardised with the checkpoint's fitted statistics
    fitted_state = torch.load(fitted.ckpt, weights_only=True)["ToyBlobs"]
    x = (np.array(RAW) - np.array(fitted_state["mean"])) / np.array(fitted_state["std"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    want = np.array([list(row["probabilities"].values()) for row in predicted])
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(ckpt: Path, log: Path) -> Iterator[str]:
    """``python -m src.tools.serve --ckpt_path CKPT`` in a subprocess; yields its URL once /health is ok."""
    httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
    pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "src.tools.serve", "--ckpt_path", str(ckpt), "--port", str(port)]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=log.parent, env=env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server never got healthy:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        # Its HTTP and inference processes too, so none outlives the test (and slows the next ones).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_serve_answers_raw_vectors_with_the_probabilities_predict_gives(
    fitted: Fitted, predicted: list[dict], tmp_path: Path
):
    import httpx

    with serving(fitted.ckpt, tmp_path / "serve.log") as url:
        served = []
        for start, size in ((0, 1), (1, len(RAW) - 1)):  # one vector alone, then several in one request
            response = httpx.post(f"{url}/predict", json={"inputs": RAW[start : start + size]}, timeout=30)
            assert response.status_code == 200, response.text
            served += response.json()["predictions"]
    assert len(served) == len(predicted)
    for got, want in zip(served, predicted, strict=True):
        assert got["predicted"] == want["predicted"]
        assert list(got["probabilities"]) == list(want["probabilities"])  # class order kept
        np.testing.assert_allclose(
            list(got["probabilities"].values()), list(want["probabilities"].values()), rtol=0, atol=PROB_ATOL
        )


# ---------------------------------------------------------------------------------- search and ablate
def test_a_two_trial_search(fitted: Fitted, tmp_path: Path):
    optuna = pytest.importorskip("optuna", reason="the search extra (optuna) is not installed")
    out = tmp_path / "search"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = run_module(
        "src.tools.search", "--config", str(CONFIG), "--space", "model.init_args.dropout=float(0.0,0.5)",
        "--trials", "2", "--study", "pair", "--storage", storage, "--output", str(out),
        "--sampler", "random", "--seed", "0", "--pruner", "none",
        "--", *tiny_toy_blobs(fitted.root), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="pair", storage=storage).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(0 <= t.value <= 1 for t in trials)
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["data"]["class_path"] == "tests.pair.toy_data.ToyBlobs"
    assert best["model"]["init_args"]["dropout"] in [t.params["model.init_args.dropout"] for t in trials]


def test_a_two_run_ablation(fitted: Fitted, tmp_path: Path):
    out = tmp_path / "ablation"
    proc = run_module(
        "src.tools.ablate", "--config", str(CONFIG), "--grid", "model.init_args.batch_norm=true,false",
        "--seeds", "1", "--output", str(out), "--runs_dir", str(tmp_path / "runs"),
        *tiny_toy_blobs(fitted.root), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    with (out / "summary.csv").open() as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"batch_norm=true", "batch_norm=false"}
    assert all(0 <= float(row["test_acc_mean"]) <= 1 for row in rows.values())
    assert (out / "summary.md").is_file()


def test_the_pair_lives_under_tests_only():
    """Nothing shipped names the pair: it is added by its own files alone."""
    shipped = list((ROOT / "src").rglob("*.py")) + list((ROOT / "configs").rglob("*.yaml"))
    assert not [p for p in shipped if "ToyBlobs" in p.read_text() or "tests.pair" in p.read_text()]
