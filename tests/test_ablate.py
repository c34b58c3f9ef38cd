"""src.tools.ablate: grid parsing, reading a run's summary.json, a real (tiny) sweep, its table, and
resuming an interrupted sweep."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from src.tools.ablate import parse_grid_arg, read_run, variants
from tests.helpers.cli import ROOT, refused, run_module

CONFIG = str(ROOT / "configs" / "mnist1d_resnet_bn.yaml")


def test_grid_arguments_parse_into_every_combination():
    assert parse_grid_arg("model.init_args.batch_norm=true,false") == (
        "model.init_args.batch_norm",
        ["true", "false"],
    )
    assert parse_grid_arg("--model.init_args.kernel_sizes=[3,5],[7]") == (
        "model.init_args.kernel_sizes",
        ["[3,5]", "[7]"],
    )
    grid = [
        parse_grid_arg("model.init_args.batch_norm=true,false"),
        parse_grid_arg("model.init_args.dropout=0.0,0.3"),
    ]
    named = variants(grid)
    assert [n for n, _ in named] == [
        "batch_norm=true+dropout=0.0",
        "batch_norm=true+dropout=0.3",
        "batch_norm=false+dropout=0.0",
        "batch_norm=false+dropout=0.3",
    ]
    assert named[1][1] == ["--model.init_args.batch_norm=true", "--model.init_args.dropout=0.3"]
    # same last component on two keys: the full keys name the variant
    clash = variants(
        [parse_grid_arg("model.init_args.dropout=0.1"), parse_grid_arg("data.init_args.dropout=0.2")]
    )
    assert clash[0][0] == "model.init_args.dropout=0.1+data.init_args.dropout=0.2"


@pytest.mark.parametrize("bad", ["batch_norm", "=1,2", "batch_norm=", "dropout=0.1,,0.2", "dropout=0.1,0.1"])
def test_bad_grid_arguments_are_refused(bad: str):
    with pytest.raises(ValueError, match="--grid"):
        parse_grid_arg(bad)


def test_a_bad_grid_on_the_command_line_is_one_line_and_creates_nothing(tmp_path: Path):
    out = tmp_path / "sweep"
    proc = run_module(
        "src.tools.ablate",
        "--config",
        CONFIG,
        "--grid",
        "model.init_args.dropout=0.1,,0.2",
        "--output",
        str(out),
        check=False,
    )
    refused(proc, "has an empty value; remove the extra comma")
    assert not out.exists()


def test_a_run_is_read_from_its_summary(tmp_path: Path):
    """The run folder is found under the run's own folder, whatever its loggers' layout; its results
    come from summary.json (SPEC: one entry per finished epoch, the test figures once tested)."""
    run = tmp_path / "seed_0" / "some_logger_name" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed_everything: 0\n")
    summary = {
        "epochs": [
            {"epoch": 0, "step": 14, "time": 1.0, "val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.2},
            {"epoch": 1, "step": 28, "time": 2.0, "train_loss": 1.0},  # no validation in this epoch
            {"epoch": 2, "step": 42, "time": 3.0, "val_acc": 0.75, "val_loss": 0.5, "train_loss": 0.8},
        ],
        "best": {"monitor": "val_acc", "mode": "max", "value": 0.75, "epoch": 2},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    assert read_run(tmp_path / "seed_0") is None  # not tested yet: not finished
    summary["test"] = {"test_acc": 0.7, "test_loss": 0.6, "time": 4.0}
    (run / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "seed_0" / "process.json").write_text('{"exit_code": 0, "wall_s": 12.5, "cpu_s": 9.0}')
    result = read_run(tmp_path / "seed_0", "v", 0)
    assert (result.test_acc, result.val_acc, result.best_val_acc) == (0.7, [(1, 0.5), (3, 0.75)], 0.75)
    assert (result.epochs_to(0.6), result.wall_s, result.cpu_s) == (3.0, 12.5, 9.0)
    assert read_run(tmp_path / "nothing") is None


@pytest.mark.slow
def test_sweep_tabulates_recorded_results_and_resumes(tmp_path: Path):
    out, runs = tmp_path / "sweep", tmp_path / "runs"
    args = [
        "--config", CONFIG,
        "--grid", "model.init_args.batch_norm=true,false",
        "--seeds", "1",
        "--output", str(out),
        "--runs_dir", str(runs),
        "--target", "0.0",
        "--trainer.max_epochs=1",  # passed through to every run
        "--trainer.limit_train_batches=3",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=400",
        "--data.init_args.val_size=40",
    ]  # fmt: skip
    first = run_module("src.tools.ablate", *args, cwd=tmp_path, timeout=600).stdout
    assert first.count(": running") == 2
    rows = {r["variant"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == {"batch_norm=true", "batch_norm=false"}
    for name, row in rows.items():
        # the table holds what the run itself printed as its test accuracy
        printed = re.search(r"test_acc\D+([0-9.]+)", (runs / name / "seed_0" / "console.log").read_text())
        assert float(row["test_acc_mean"]) == pytest.approx(float(printed.group(1)), abs=1e-4)
        assert row["runs"] == "1" and row["epochs_to_target_mean"] == "1.0"
    table = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["epochs"] for r in table] == ["1", "1"]
    assert all(float(r["cpu_s"]) > 0 and float(r["wall_s"]) > 0 for r in table)  # kept for resumed sweeps
    assert "| batch_norm=false | 1 |" in (out / "summary.md").read_text()
    assert (out / "val_acc.png").stat().st_size > 0

    # a second call skips the finished run and runs the interrupted one (its folder left without
    # test results) again, alone
    (summary,) = (runs / "batch_norm=false" / "seed_0").rglob("summary.json")
    summary.unlink()
    again = run_module("src.tools.ablate", *args, cwd=tmp_path, timeout=600).stdout
    assert again.count("finished before, skipped") == 1 and again.count(": running") == 1
    assert "batch_norm=true seed 0: finished before, skipped" in again
    assert "batch_norm=false seed 0: running" in again
    assert list((runs / "batch_norm=false" / "seed_0").rglob("summary.json"))
    assert {r["variant"] for r in csv.DictReader((out / "summary.csv").open())} == set(rows)


def test_a_variant_the_cli_refuses_stops_the_sweep_before_any_run(tmp_path: Path):
    out = tmp_path / "sweep"
    proc = run_module("src.tools.ablate", "--config", CONFIG, "--grid", "model.init_args.bn_position=before_activation,sideways",
                      "--output", str(out), "--runs_dir", str(tmp_path / "runs"), check=False)  # fmt: skip
    said = refused(proc, "error: the CLI refused variant bn_position=sideways: ")
    assert len(said.strip().splitlines()) == 1, said
    assert not out.exists() and not (tmp_path / "runs").exists()
