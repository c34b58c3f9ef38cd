"""src.tools.ablate: grid parsing, a real (tiny) sweep, its table, and resuming an interrupted sweep."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from src.tools.ablate import main, parse_grid_arg, variants
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


@pytest.mark.slow
def test_sweep_tabulates_logged_results_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    monkeypatch.setenv("BN_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    args = [
        "--config", CONFIG,
        "--grid", "model.init_args.batch_norm=true,false",
        "--seeds", "1",
        "--output", str(out),
        "--runs_dir", str(tmp_path / "runs"),
        "--target", "0.0",
        "--trainer.max_epochs=1",  # passed through to every run
        "--trainer.limit_train_batches=3",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=400",
        "--data.init_args.val_size=40",
    ]  # fmt: skip
    main(args)
    first = capsys.readouterr().out
    assert first.count(": running") == 2
    rows = {r["variant"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == {"batch_norm=true", "batch_norm=false"}
    for name, row in rows.items():
        # the table holds what the run itself printed as its test accuracy
        printed = re.search(r"test_acc\D+([0-9.]+)", (tmp_path / "runs" / name / "seed_0.txt").read_text())
        assert float(row["test_acc_mean"]) == pytest.approx(float(printed.group(1)), abs=1e-4)
        assert row["runs"] == "1" and row["epochs_to_target_mean"] == "1.0"
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["epochs"] for r in runs] == ["1", "1"]
    assert all(float(r["cpu_s"]) > 0 for r in runs)  # each run's CPU time, kept for resumed sweeps
    assert "| batch_norm=false | 1 |" in (out / "summary.md").read_text()
    assert (out / "val_acc.png").stat().st_size > 0

    # a second call skips both finished runs
    main(args)
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    # an interrupted run (its folder left without test results) is run again, alone
    interrupted = tmp_path / "runs" / "batch_norm=false" / "seed_0"
    for f in interrupted.glob("events.out.tfevents.*"):
        f.unlink()
    main(args)
    again = capsys.readouterr().out
    assert again.count("finished before, skipped") == 1 and "batch_norm=false seed 0: running" in again
    assert list(interrupted.glob("events.out.tfevents.*"))
