"""The command line as a user meets it: options, the run folder, checkpoint-only commands and quiet output."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import subprocess
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


@pytest.fixture(scope="module")
def printed() -> str:
    """``--print_config`` of the MNIST-1D config with a model option and two callbacks' options set."""
    return run_cli(
        "fit", "--config", MNIST1D, "--model.init_args.hidden_size=64",
        "--callbacks.LastCheckpoint.every_n_train_steps=5", "--callbacks.TQDMProgressBar.refresh_rate", "3",
        "--print_config",
    ).stdout  # fmt: skip


@pytest.mark.slow
def test_print_config_reloads_as_a_config(printed: str, tmp_path: Path):
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert yaml.safe_load(printed)["model"]["init_args"]["hidden_size"] == 64
    again = run_cli("fit", "--config", str(path), "--print_config")
    assert yaml.safe_load(again.stdout) == yaml.safe_load(printed)


def short_error(out, *fragments: str) -> str:
    """A parse error in the project's form: ``error: ...`` in a few lines naming the problem and where
    the options are listed, no usage dump, nothing started."""
    said = refused(out, *fragments)
    assert said.startswith("error: ") and len(said.strip().splitlines()) <= 5, said
    assert "usage:" not in said and "--help" in said, said
    return said


# One case per way an option goes wrong (each a branch of src/runtime/command_line.py's explanation):
# an unknown key of a class (the model's; the data's is the same branch; found by a close spelling),
# an unknown option (found by its last part), a value outside its declared range (a whole number's
# > 0; a rate's >= 0 and < 1), not a whole number, not a choice, the trainer's own types, no such
# class (its suggestion and the choices), and a callback option on the wrong callback.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.hiden_size=3"], ["--model.init_args.hiden_size: ResidualBN has no option 'hiden_size'",
                                             "Did you mean --model.init_args.hidden_size", "--model.help ResidualBN"]),
        pytest.param(["--max_epochs=3"], ["unknown option --max_epochs.", "Did you mean --trainer.max_epochs"],
                     marks=pytest.mark.slow),
        pytest.param(["--model.init_args.hidden_size=wide"], ["--model.init_args.hidden_size=wide: not a whole number"],
                     marks=pytest.mark.slow),
        pytest.param(["--data.init_args.batch_size=0"], ["--data.init_args.batch_size=0: must be > 0"],
                     marks=pytest.mark.slow),
        (["--model.init_args.dropout=1.5"], ["--model.init_args.dropout=1.5: must be >= 0 and < 1"]),
        pytest.param(["--model.init_args.optimizer.init_args.lr=0.1"], ["Did you mean --model.init_args.lr?"],
                     marks=pytest.mark.slow),
        pytest.param(["--data.init_args.loader=gpu"], ["loader=gpu: must be one of 'tensors', 'dataloader'"],
                     marks=pytest.mark.slow),
        pytest.param(["--trainer.max_epochs=x"], ["--trainer.max_epochs=x: expected int or null"],
                     marks=pytest.mark.slow),
        pytest.param(["--model=ResidualBn"], ["--model=ResidualBn: no such class. Did you mean ResidualBN?",
                     "The choices: BNCNN, MLPBNDropout, ResidualBN (or a full import path)."], marks=pytest.mark.slow),
        pytest.param(["--trainer.callbacks.every_n_train_steps=5"],
                     ["sets an option of the last callback in trainer.callbacks (PredictionWriter)",
                      "--callbacks.LastCheckpoint.every_n_train_steps=5"], marks=pytest.mark.slow),
    ],
    ids=[
        "unknown-model-key", "unknown-top-level", "wrong-type", "batch-0", "dropout-1.5",
        "optimizer-lr", "bad-choice", "trainer-wrong-type", "misspelt-model", "callback-option-of-another",
    ],
)  # fmt: skip
def test_a_bad_option_stops_with_a_short_error_naming_it(
    tmp_path: Path, args: list[str], expected: list[str]
):
    out = run_cli("fit", "--config", MNIST1D, *quiet(tmp_path), *args, cwd=tmp_path, check=False)
    short_error(out, *expected)
    assert not list(tmp_path.rglob("version_*"))


@pytest.mark.slow
def test_a_misspelt_key_in_a_stacked_config_is_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    out = run_cli("fit", "--config", MNIST1D, "--config", str(bad), check=False)
    short_error(out, f"trainer.max_epoch is not an option (set in {bad})", "Did you mean trainer.max_epochs")


@pytest.mark.slow
def test_a_config_file_that_is_not_yaml_settings_is_named_with_its_line(tmp_path: Path):
    broken, listed = tmp_path / "broken.yaml", tmp_path / "list.yaml"
    broken.write_text("trainer:\n  max_epochs: [3\n")
    listed.write_text("- trainer\n")
    said = refused(
        run_cli("fit", "--config", str(broken), check=False), f"--config {broken} is not valid YAML"
    )
    assert "(line 3, column 1)" in said and len(said.strip().splitlines()) == 1
    refused(
        run_cli("fit", "--config", str(listed), check=False), f"--config {listed} holds a list, not settings"
    )
    refused(run_cli("fit", "--config", str(tmp_path / "none.yaml"), check=False), "none.yaml: no such file")


@pytest.fixture(scope="module")
def stopped_fit(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny fit that saves every 5 steps by the callback's name, stopped at once at step 7 (two
    Ctrl-C), with the model's linked num_classes set by hand; its folder and what it printed."""
    root = tmp_path_factory.mktemp("stopped")
    out = run_cli(
        "fit", "--config", MNIST1D, *tiny_mnist1d(root), *quiet(root), "--model.init_args.num_classes=3",
        "--callbacks.LastCheckpoint.every_n_train_steps=5", "--trainer.callbacks+=tests.helpers.faults.SignalAt",
        "--trainer.callbacks.phase=train", "--trainer.callbacks.at=7", f"--trainer.callbacks.signum={int(signal.SIGINT)}",
        "--trainer.callbacks.times=2", cwd=root, check=False,
    )  # fmt: skip
    return root, out


@pytest.mark.slow
def test_one_callbacks_option_is_set_by_the_callbacks_name(printed: str, stopped_fit):
    listed = yaml.safe_load(printed)["trainer"]["callbacks"]
    original = yaml.safe_load(Path(MNIST1D).read_text())["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in listed] == [
        c["class_path"].rsplit(".", 1)[-1] for c in original
    ]  # the same callbacks, in the same order
    options = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args") or {} for c in listed}
    assert options["LastCheckpoint"]["every_n_train_steps"] == 5
    assert options["TQDMProgressBar"]["refresh_rate"] == 3 and options["EarlyStopping"]["patience"] == 40
    # A real run saves every 5 steps: stopped at once at step 7 (two Ctrl-C), its last.ckpt holds step 5.
    root, out = stopped_fit
    # A second Ctrl-C stops at once; the one line, the last on stderr, names the last save it keeps.
    refused(out, code=130)
    line = out.stderr.strip().splitlines()[-1]
    assert "Stopped at once by SIGINT at training step 7." in line and "last.ckpt holds step 5" in line, line
    assert torch.load(next(root.rglob("last.ckpt")), weights_only=True)["global_step"] == 5
    saved = yaml.safe_load(next(root.rglob("config.yaml")).read_text())["trainer"]["callbacks"]
    assert {c["class_path"]: c.get("init_args") for c in saved}["src.callbacks.LastCheckpoint"][
        "every_n_train_steps"
    ] == 5
    for args, message in (
        (["--callbacks.LastCheckpoint.every_n_train_step=5"], "Did you mean --callbacks.LastCheckpoint.every_n_train_steps?"),
        (["--callbacks.LastCheckpoint.every_n_train_steps=x"], "LastCheckpoint's every_n_train_steps=x: not a whole number"),
        (["--callbacks.SWA.swa_lrs=0.1"], "trainer.callbacks holds no SWA callback"),
    ):  # fmt: skip
        refused(run_cli("fit", "--config", MNIST1D, *args, check=False), message)


@pytest.mark.slow
def test_a_linked_value_set_by_hand_warns_that_the_data_decides(stopped_fit):
    _, out = stopped_fit
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
def test_a_model_option_contradicting_the_checkpoint_is_named(main_job, tmp_path: Path):
    shutil.copytree(main_job[0], tmp_path, dirs_exist_ok=True)  # the main job's run, left as it is
    ckpt = next(tmp_path.rglob("version_0/checkpoints/last.ckpt"))
    out = run_cli("test", "--ckpt_path", str(ckpt), "--model.init_args.batch_norm=false", cwd=tmp_path)
    assert "The checkpoint's model settings are used, not the command's" in out.stderr
    assert "model.init_args.batch_norm: False -> True" in out.stderr


# --ckpt_path=best outside a fit: tests/test_refused_commands.py.
