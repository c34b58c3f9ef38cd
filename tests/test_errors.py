"""Every mistake a user can make on the command line gets ``error: <what to do>``, a non-zero exit
status and no traceback, and nothing already on disk is harmed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import config, env, read_only, refused, run_cli
from tests.helpers.data import quiet, tiny_ag_news, tiny_mnist1d, write_tiny_ag_news
from tests.helpers.serving import tiny_checkpoint

pytestmark = pytest.mark.slow

MNIST1D, AG_NEWS = config("mnist1d_resnet_bn"), config("ag_news_cnn_bn")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory) -> Path:
    """A finished tiny MNIST-1D run that bad commands must leave untouched; its learning rate has no
    schedule laid over its length, so a resume may extend it (tests that change it take a copy)."""
    root = tmp_path_factory.mktemp("mnist1d")
    run_cli(*fit(root, "--model.init_args.lr_scheduler=null"), cwd=root)
    return root


@pytest.fixture
def unharmed(mnist1d_run: Path):
    before = snapshot(mnist1d_run / "logs")
    yield mnist1d_run
    after = snapshot(mnist1d_run / "logs")
    assert {k: after.get(k) for k in before} == before


def fit(root: Path, *extra: str, cfg: str = MNIST1D) -> list[str]:
    return ["fit", "--config", cfg, *tiny_mnist1d(root), *quiet(root), *extra]


# A bad val_size: tests/test_refused_commands.py; limit_train_batches=0 meets max_epochs=0's check; a
# model that cannot read the data: test_a_model_that_cannot_read_the_data_leaves_no_run_folder.
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.max_epochs=0"], "--trainer.max_epochs=0 trains nothing"),
        (["--trainer.accelerator=cpu", "--trainer.devices=100000"], "asks for 100000 CPU device(s)"),
    ],
    ids=["max-epochs-0", "devices"],
)
def test_settings_that_cannot_run(unharmed: Path, tmp_path: Path, extra: list[str], message: str):
    refused(run_cli(*fit(unharmed, *extra), cwd=tmp_path, check=False), message)
    assert not list((unharmed / "logs").rglob("version_1"))  # no empty run folder left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_gpu_on_a_machine_without_one(unharmed: Path, tmp_path: Path):
    refused(
        run_cli(*fit(unharmed, "--trainer.accelerator=gpu"), cwd=tmp_path, check=False),
        "no CUDA GPU",
        "--trainer.accelerator=cpu",
    )


def test_an_unwritable_log_folder(unharmed: Path, tmp_path: Path):
    blocker = next((unharmed / "logs").rglob("config.yaml"))  # a file where a folder must go
    out = run_cli(*fit(unharmed, f"--trainer.logger.init_args.save_dir={blocker}"), cwd=tmp_path, check=False)
    refused(out, "cannot write the log folder", "--trainer.logger.init_args.save_dir")


def test_a_model_that_cannot_read_the_data_leaves_no_run_folder(tmp_path: Path):
    out = run_cli(*fit(tmp_path, "--model=MLPBNDropout", cfg=AG_NEWS)[:3], "--model=MLPBNDropout",
                  *tiny_ag_news(tmp_path), *quiet(tmp_path), cwd=tmp_path, check=False)  # fmt: skip
    refused(out, "MLPBNDropout reads feature vectors (signals, images), but AGNews yields token ids (text)")
    assert not list(tmp_path.rglob("version_*"))


def test_an_error_inside_a_network_is_reported_as_itself(tmp_path: Path):
    out = run_cli(*fit(tmp_path, "--model=tests.helpers.models.BrokenResidualBN"), cwd=tmp_path, check=False)
    assert out.returncode != 0 and "boom inside the network" in out.stderr
    assert "Pair the model" not in out.stderr


@pytest.mark.parametrize(
    ("step", "kept"),
    [(3, "no checkpoint was written before it, so the run has none to resume from"), (16, "last.ckpt")],
    ids=["before-any-checkpoint", "after-an-epoch"],
)
def test_a_non_finite_loss_says_which_checkpoints_exist(tmp_path: Path, step: int, kept: str):
    poison = ["--trainer.callbacks+=tests.helpers.faults.PoisonAt", f"--trainer.callbacks.step={step}"]
    out = run_cli(*fit(tmp_path, "--trainer.max_epochs=2", *poison), cwd=tmp_path, check=False)
    said = refused(out, "the training loss became non-finite (NaN or inf) at training step", kept, code=1)
    assert "still good" not in said
    if step > 14:  # one epoch of 14 steps was saved: both its checkpoints are named and intact
        assert "the checkpoints written before it are intact" in said and "epoch000-val_acc" in said
        assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["global_step"] == 14
    else:
        assert not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------- checkpoints
# A missing or corrupt --ckpt_path, on every subcommand: tests/test_refused_commands.py.
def test_a_checkpoint_of_other_sizes_or_data(unharmed: Path, tmp_path: Path):
    ckpt = next((unharmed / "logs").rglob("last.ckpt"))
    other_length = run_cli("test", "--config", MNIST1D, *tiny_mnist1d(unharmed), "--data.init_args.length=60",
                           f"--ckpt_path={ckpt}", *quiet(tmp_path), cwd=tmp_path, check=False)  # fmt: skip
    # the stem's weight: (config's width, signal length)
    refused(other_length, "does not fit the model this run builds", ", 40), this model (", ", 60))")
    other_data = run_cli("test", "--config", AG_NEWS, *tiny_ag_news(tmp_path), f"--ckpt_path={ckpt}",
                         *quiet(tmp_path), cwd=tmp_path, check=False)  # fmt: skip
    refused(other_data, "holds a src.data.MNIST1D data, but this run builds data src.data.AGNews")


# ---------------------------------------------------------------------------------- data
def _ag_news_parquet(folder: Path, texts: list, labels: list) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"text": texts, "label": labels}), folder / f"{split}.parquet")
    return f"--data.init_args.data_dir={folder}"


@pytest.mark.parametrize(
    ("texts", "labels", "message"),
    [
        (
            ["stocks rise"] * 8,
            ["Business"] * 8,
            "The label of row 0 of the train split is 'Business', not a class index",
        ),
        (["stocks rise"] * 8, [0, 1, None, 3, 0, 1, 2, 3], "The label of row 2 of the train split is None"),
        (["", "  ", None, "", "", "", "", ""], [0, 1, 2, 3] * 2, "The training texts hold no word"),
    ],
    ids=["string-labels", "null-label", "empty-texts"],
)
def test_bad_ag_news_rows(tmp_path: Path, texts: list, labels: list, message: str):
    source = _ag_news_parquet(tmp_path / "data", texts, labels)
    out = run_cli("fit", "--config", AG_NEWS, source, f"--data.init_args.cache_dir={tmp_path / 'cache'}",
                  "--data.init_args.val_size=2", "--data.init_args.min_freq=1", *quiet(tmp_path), cwd=tmp_path, check=False)  # fmt: skip
    refused(out, message)


@pytest.fixture(scope="module")
def ag_news_ckpt(runs_root: Path) -> Path:
    """The session's tiny AG News checkpoint (shared with other modules: commands that write logs
    write them under their own tmp_path)."""
    return tiny_checkpoint("ag_news_cnn_bn", runs_root)


def test_predict_inputs_that_cannot_be_read(ag_news_ckpt: Path, tmp_path: Path):
    ckpt = ag_news_ckpt
    latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty.write_bytes(b"")
    for source, message in (
        (latin1, "is not UTF-8 text"),
        (tmp_path, "is a folder"),
        (empty, "No texts to predict"),
    ):
        out = run_cli(
            "predict",
            "--ckpt_path",
            str(ckpt),
            f"--data.init_args.predict_file={source}",
            cwd=tmp_path,
            check=False,
        )
        refused(out, message)


def test_a_predictions_file_is_checked_before_predicting(ag_news_ckpt: Path, tmp_path: Path):
    ckpt = ag_news_ckpt
    folder = run_cli(
        "predict",
        "--ckpt_path",
        str(ckpt),
        f"--trainer.callbacks.output={tmp_path}",
        cwd=tmp_path,
        check=False,
    )
    refused(folder, "is a folder. Pass a .csv or .json file name")
    existing = tmp_path / "mine.csv"
    existing.write_text("keep me")
    out = run_cli(
        "predict",
        "--ckpt_path",
        str(ckpt),
        f"--trainer.callbacks.output={existing}",
        cwd=tmp_path,
        check=False,
    )
    refused(out, "already exists", "--trainer.callbacks.overwrite=true")
    assert existing.read_text() == "keep me"
    # Overwritten with the predictions of texts given as a JSON list (an empty one and non-ASCII ones too).
    texts = json.dumps(["Stocks rise", "", "Café 東京"])
    out = run_cli(
        "predict", "--ckpt_path", str(ckpt), f"--data.init_args.predict_texts={texts}",
        f"--trainer.callbacks.output={existing}", "--trainer.callbacks.overwrite=true",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", cwd=tmp_path,
    )  # fmt: skip
    assert "Wrote 3 predictions" in out.stdout + out.stderr
    assert existing.read_text().startswith("index,predicted") and len(existing.read_text().splitlines()) == 4


def test_a_truncated_data_cache_is_rebuilt(mnist1d_run: Path, tmp_path: Path):
    shutil.copytree(mnist1d_run / "cache", tmp_path / "cache")  # the cache a fit of these settings wrote
    cache = next((tmp_path / "cache").glob("mnist1d_*.pt"))
    cache.write_bytes(cache.read_bytes()[:1000])
    out = run_cli(*fit(tmp_path), cwd=tmp_path)
    assert "unreadable" in out.stderr and "rebuilding it" in out.stderr
    assert torch.load(cache, weights_only=True)["x"].shape == (480, 40)


def test_a_read_only_data_cache_is_enough_to_resume(mnist1d_run: Path, tmp_path: Path):
    shutil.copytree(mnist1d_run, tmp_path, dirs_exist_ok=True)  # a run a resume may extend, and its cache
    prefix = read_only(tmp_path / "cache")
    if prefix is None:
        pytest.skip(
            "running as root without mount namespaces (unshare -m): no way to make a folder read-only"
        )
    (tmp_path / "cache").chmod(0o555)
    try:
        args = [
            *fit(tmp_path, "--trainer.max_epochs=2", "--model.init_args.lr_scheduler=null"),
            "--ckpt_path=last",
        ]
        out = subprocess.run([*prefix, sys.executable, "-m", "src.cli", *args], cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["epoch"] == 1


def test_write_tiny_ag_news_is_deterministic(tmp_path: Path):
    a, b = write_tiny_ag_news(tmp_path / "a"), write_tiny_ag_news(tmp_path / "b")
    assert Path(a["train"]).read_bytes() == Path(b["train"]).read_bytes()
