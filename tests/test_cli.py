"""The command line as a user meets it: options, the run folder, checkpoint-only commands and quiet output."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.cli import config, refused, run_cli
from tests.helpers.data import quiet, tiny_mnist1d

MNIST1D = config("mnist1d_resnet_bn")

# Warnings the default commands may print, each with why it stays: none today. A new warning in
# `fit`, `test` or `predict` of the README's main job fails test_the_main_job_prints_no_warning.
ALLOWED_WARNINGS: tuple[str, ...] = ()


def test_help_lists_model_and_data_options_with_their_documentation():
    out = run_cli("fit", "--config", MNIST1D, "--help")
    assert "--model" in out.stdout and "--data" in out.stdout and "--test_after_fit" in out.stdout
    model_help = run_cli("fit", "--model.help", "ResidualBN").stdout
    for option, doc in (
        ("hidden_size", "width of the residual stream"),
        ("batch_norm", "BatchNorm in every block"),
    ):
        assert f"--model.{option}" in model_help and doc in model_help


@pytest.mark.slow
def test_print_config_reloads_as_a_config(tmp_path: Path):
    out = run_cli("fit", "--config", MNIST1D, "--model.init_args.hidden_size=64", "--print_config")
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.stdout)
    assert yaml.safe_load(out.stdout)["model"]["init_args"]["hidden_size"] == 64
    again = run_cli("fit", "--config", str(printed), "--print_config")
    assert yaml.safe_load(again.stdout) == yaml.safe_load(out.stdout)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.hiden_size=3"], "hiden_size"),
        pytest.param(["--model.init_args.hidden_size=wide"], "hidden_size", marks=pytest.mark.slow),
        pytest.param(["--data.init_args.batch_size=0"], "batch_size", marks=pytest.mark.slow),
        pytest.param(["--model.init_args.dropout=1.5"], "dropout", marks=pytest.mark.slow),
        pytest.param(["--model.init_args.hidden_size=0"], "hidden_size", marks=pytest.mark.slow),
        pytest.param(["--model.init_args.num_blocks=-1"], "num_blocks", marks=pytest.mark.slow),
        pytest.param(["--model.init_args.lr=0"], "lr", marks=pytest.mark.slow),
        pytest.param(
            ["--model.init_args.optimizer.init_args.lr=0.1"],
            "Option 'lr' is not accepted",
            marks=pytest.mark.slow,
        ),
        pytest.param(["--data.init_args.loader=gpu"], "loader", marks=pytest.mark.slow),
        pytest.param(["--model=NoSuchNet"], "NoSuchNet", marks=pytest.mark.slow),
        pytest.param(["--data=src.data.NoSuchData"], "NoSuchData", marks=pytest.mark.slow),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "batch-0",
        "dropout-1.5",
        "hidden-0",
        "blocks-negative",
        "lr-0",
        "optimizer-lr",
        "bad-choice",
        "unknown-model",
        "unknown-data",
    ],  # fmt: skip
)
def test_a_bad_option_stops_with_an_error_naming_it(tmp_path: Path, args: list[str], expected: str):
    out = run_cli("fit", "--config", MNIST1D, *quiet(tmp_path), *args, cwd=tmp_path, check=False)
    refused(out, expected)
    assert not list(tmp_path.rglob("version_*"))


@pytest.mark.slow
def test_a_misspelt_key_in_a_stacked_config_is_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    refused(run_cli("fit", "--config", MNIST1D, "--config", str(bad), check=False), "max_epoch")


@pytest.mark.slow
def test_a_linked_value_set_by_hand_warns_that_the_data_decides(tmp_path: Path):
    out = run_cli(
        "fit", "--config", MNIST1D, "--model.init_args.num_classes=3", "--trainer.fast_dev_run=true",
        *tiny_mnist1d(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert "model.init_args.num_classes is set in the config, but it is linked from the data" in out.stderr


# ---------------------------------------------------------------------------------- the main job
@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """README's main job (the MNIST-1D default config, full data) for two epochs, then test and
    predict from its checkpoint alone; returns the folder and what each command printed to stderr."""
    root = tmp_path_factory.mktemp("main_job")
    said = {}
    said["fit"] = run_cli("fit", "--config", MNIST1D, "--trainer.max_epochs=2", cwd=root).stderr
    ckpt = next(root.rglob("last.ckpt"))
    said["test"] = run_cli("test", "--ckpt_path", str(ckpt), cwd=root).stderr
    said["predict"] = run_cli("predict", "--ckpt_path", str(ckpt), cwd=root).stderr
    return root, said


@pytest.mark.slow
def test_the_main_job_prints_no_warning(main_job):
    _, said = main_job
    for command, stderr in said.items():
        warned = [
            line
            for line in stderr.splitlines()
            if re.search(r"Warning|warn\(", line) or ": UserWarning" in line
        ]
        warned += [
            line for line in stderr.splitlines() if re.match(r"^/.+\.py:\d+: ", line)
        ]  # Lightning's form
        unexplained = [w for w in warned if not any(a in w for a in ALLOWED_WARNINGS)]
        assert not unexplained, f"{command}: {unexplained}"
        assert "Traceback" not in stderr


@pytest.mark.slow
def test_the_run_folder_holds_logs_config_and_both_checkpoints(main_job):
    root, _ = main_job
    run = root / "lightning_logs" / "mnist1d_resnet_bn" / "version_0"
    assert (
        list(run.glob("events.out.tfevents.*"))
        and (run / "config.yaml").is_file()
        and (run / "hparams.yaml").is_file()
    )
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(re.fullmatch(r"epoch\d{3}-val_acc[\d.]+\.ckpt", p) for p in ckpts), (
        ckpts
    )
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the last epoch
    assert (run / "per_class_report.json").is_file()  # the test after fit
    assert sorted(p.name for p in root.iterdir()) == ["data_cache", "lightning_logs"]  # nothing else written


@pytest.mark.slow
def test_checkpoint_only_commands_run_as_the_run_that_wrote_the_checkpoint(main_job):
    root, said = main_job
    task = root / "lightning_logs" / "mnist1d_resnet_bn"
    assert sorted(p.name for p in task.iterdir()) == [
        "version_0",
        "version_1",
        "version_2",
    ]  # the task's folder
    tested, predicted = task / "version_1", task / "version_2"
    assert (tested / "per_class_report.json").is_file()  # the configured callbacks ran
    rows = list(csv.DictReader((predicted / "predictions.csv").open()))
    assert len(rows) == 1000 and "p_9" in rows[0]
    assert "Wrote 1000 predictions" in said["predict"] and "[0] " in said["predict"]
    for command in ("test", "predict"):
        assert "Seed set to 0" in said[command]  # the run's seed
    saved = yaml.safe_load((tested / "config.yaml").read_text())["model"]["init_args"]
    assert saved["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert saved["lr_scheduler"]["class_path"] == "src.models.OneCycleLR"


@pytest.mark.slow
def test_a_model_option_contradicting_the_checkpoint_is_named(tmp_path: Path):
    data = tiny_mnist1d(tmp_path)
    run_cli(
        "fit",
        "--config",
        MNIST1D,
        "--model.init_args.batch_norm=false",
        *data,
        *quiet(tmp_path),
        cwd=tmp_path,
    )
    ckpt = next(tmp_path.rglob("last.ckpt"))
    out = run_cli("test", "--ckpt_path", str(ckpt), "--model.init_args.batch_norm=true", cwd=tmp_path)
    assert "The checkpoint's model settings are used, not the command's" in out.stderr
    assert "model.init_args.batch_norm: True -> False" in out.stderr


@pytest.mark.slow
def test_best_is_only_a_checkpoint_of_a_fit_in_the_same_command(tmp_path: Path):
    out = run_cli(
        "test", "--config", MNIST1D, "--ckpt_path=best", *tiny_mnist1d(tmp_path), cwd=tmp_path, check=False
    )
    refused(out, "--ckpt_path=best names the best checkpoint of a fit in the same command")
