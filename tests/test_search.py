"""src.tools.search: space specs, pruner specs, the trial budget, and real (tiny) searches as a user runs them.

The searches run ``python -m src.tools.search`` in a subprocess on MNIST-1D with 600 samples and two
epochs per trial, so each trial is a few seconds of training after a few seconds of start-up.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="the search extra (optuna) is not installed")

from optuna.trial import TrialState  # noqa: E402

from src.tools.search import (  # noqa: E402
    Setup,
    UsageError,
    _open_study,
    baseline_params,
    build_pruner,
    counted,
    labels,
    open_storage,
    parse_space,
    retried_numbers,
    split_top_level,
)
from tests.helpers.cli import ROOT  # noqa: E402

CONFIG = str(ROOT / "configs" / "mnist1d_resnet_bn.yaml")
# One-cycle peak LR: 0.02 learns, 1e-6 stays at chance (a clearly bad trial for the pruner).
LR_CHOICE = "model.init_args.lr=choice(0.02,1.0e-06)"
DROPOUT = "model.init_args.dropout=float(0.0,0.5)"
# RandomSampler(seed=6) draws lr 0.02, 1e-6, 0.02 for the first three trials (with the
# dropout drawn after it in each trial): trial 1 is the bad one.
PRUNING = ["--sampler", "random", "--seed", "6", "--pruner", "median(n_startup_trials=1,n_warmup_steps=0)"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist1d_cache")


def tiny(cache: Path, epochs: int = 2) -> list[str]:
    """Overrides after `--`: a few seconds per trial."""
    return [
        "--",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
        "--data.init_args.batch_size=32",
        f"--data.init_args.cache_dir={cache}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
    ]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "src.tools.search", "--config", CONFIG, *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": "1"}


def search(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run ``python -m src.tools.search --config <MNIST-1D> ARGS`` as a user would."""
    return subprocess.run(command(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def trials_of(output: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{output / 'study.db'}")
    return loaded.get_trials(deepcopy=False)


def hparams_keys(run_dir: Path) -> set[str]:
    """The hyperparameter names of the run's TensorBoard HPARAMS session."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    keys: set[str] = set()
    for f in run_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    keys |= set(data.session_start_info.hparams)
    return keys


# ---------------------------------------------------------------------- specs (fast)
def test_space_specs_parse_into_distributions():
    p = parse_space("model.init_args.dropout=float(0.0,0.5)")
    assert (p.key, p.kind, p.low, p.high, p.log) == ("model.init_args.dropout", "float", 0.0, 0.5, False)
    p = parse_space("--model.init_args.lr=float(1e-4, 1e-1, log)")
    assert (p.key, p.low, p.high, p.log) == ("model.init_args.lr", 1e-4, 0.1, True)
    assert p.probe_values() == [1e-4, 0.1] and p.override(1e-05) == "--model.init_args.lr=1e-05"
    p = parse_space("model.init_args.hidden_size=int(64,512,log)")
    assert (p.kind, p.low, p.high, p.log, p.probe_values()) == ("int", 64, 512, True, [64, 512])
    p = parse_space("model.init_args.hidden_sizes=choice([512,256],[1024, 512])")
    assert p.choices == ("[512,256]", "[1024, 512]")
    assert p.override("[512,256]") == "--model.init_args.hidden_sizes=[512,256]"
    assert parse_space(p.spec) == p  # the spec stored with the study reads back the same
    assert split_top_level("a,{b: 1, c: 2},(3,4)") == ["a", "{b: 1, c: 2}", "(3,4)"]
    names = labels(
        [parse_space("model.init_args.dropout=float(0,1)"), parse_space("data.init_args.dropout=float(0,1)")]
    )
    assert names == {
        "model.init_args.dropout": "model.init_args.dropout",
        "data.init_args.dropout": "data.init_args.dropout",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.init_args.dropout", "expected KEY=TYPE(ARGS)"),
        ("model.init_args.dropout=", "expected KEY=TYPE(ARGS)"),
        ("model.init_args.dropout=0.3", "expected float(LOW,HIGH[,log])"),
        ("model.init_args.dropout=uniform(0,1)", "unknown type 'uniform'"),
        ("model.init_args.dropout=float(0.5)", "float takes LOW,HIGH"),
        ("model.init_args.dropout=float(0,1,ln)", "float takes LOW,HIGH"),
        ("model.init_args.dropout=float(a,1)", "must be numbers"),
        ("model.init_args.dropout=float(0.5,0.1)", "LOW must be below HIGH"),
        ("model.init_args.lr=float(0,0.1,log)", "needs LOW > 0"),
        ("model.init_args.hidden_size=int(8,16.5)", "must be integers"),
        ("model.init_args.bn_position=choice(before_activation)", "at least two values"),
        ("model.init_args.bn_position=choice(a,,b)", "empty choice"),
        ("model.init_args.bn_position=choice(a,a)", "repeated"),
        ("model init_args=float(0,1)", "not a CLI key"),
    ],
)
def test_malformed_space_specs_are_refused(spec: str, message: str):
    with pytest.raises(UsageError, match=r"--space .*" + re.escape(message)):
        parse_space(spec)


def test_baseline_takes_the_configs_own_values_when_inside_the_space():
    config = yaml.safe_load((ROOT / "configs" / "fashion_mnist_mlp_bn.yaml").read_text())
    space = [
        parse_space("model.init_args.hidden_sizes=choice([1024,512],[512,256])"),
        parse_space("model.init_args.dropout=float(0.1,0.5)"),
        parse_space("model.init_args.lr=float(1e-3,3e-2,log)"),
        parse_space("data.init_args.batch_size=choice(128,256)"),
        parse_space("data.init_args.hflip=choice(true,false)"),
    ]
    params, outside = baseline_params(config, space)
    assert outside == []
    assert params == {
        "model.init_args.hidden_sizes": "[512,256]",
        "model.init_args.dropout": 0.3,
        "model.init_args.lr": 0.01,
        "data.init_args.batch_size": "256",
        "data.init_args.hflip": "false",
    }
    _, outside = baseline_params(config, [parse_space("model.init_args.dropout=float(0.4,0.5)")])
    assert outside == ["model.init_args.dropout=0.3"]


def test_pruner_specs():
    assert type(build_pruner("median")).__name__ == "MedianPruner"
    pruner = build_pruner("median(n_startup_trials=2,n_warmup_steps=3)")
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 3)
    assert type(build_pruner("halving(min_resource=2)")).__name__ == "SuccessiveHalvingPruner"
    assert type(build_pruner("none")).__name__ == "NopPruner"
    assert build_pruner("threshold(lower=0.5)")._lower == 0.5
    for bad in ("medain", "median(n_startup_trials)", "median(bogus=1)", "median(n_startup_trials=-1"):
        with pytest.raises(UsageError, match="--pruner"):
            build_pruner(bad)


def test_budget_counts_finished_and_running_trials_but_not_failures_run_again():
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def trial(number: int, state: TrialState, history: list[int] | None = None) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(
            state=state,
            value=0.5 if state == TrialState.COMPLETE else None,
            params={"x": 0.5},
            distributions=dist,
            system_attrs={"retry_history": history} if history else {},
        )
        t.number = number
        return t

    trials = [
        trial(0, TrialState.COMPLETE),
        trial(1, TrialState.FAIL),  # killed with its search, run again as trial 3
        trial(2, TrialState.FAIL),  # the run itself failed: counts, never retried
        trial(3, TrialState.RUNNING, history=[1]),
        trial(4, TrialState.FAIL),  # interrupted with its search; its values wait in trial 5
        trial(5, TrialState.WAITING, history=[4]),  # enqueued, not started: not counted yet
        trial(6, TrialState.PRUNED),
    ]
    assert retried_numbers(trials) == {1: 3, 4: 5}
    assert [t.number for t in counted(trials)] == [0, 2, 3, 6]
    trials[5].system_attrs = {}  # had 4 not been enqueued again, it would use the budget
    assert [t.number for t in counted(trials)] == [0, 2, 3, 4, 6]


def _setup(db: Path, metric: str = "val/acc") -> Setup:
    return Setup([CONFIG], [], [parse_space(DROPOUT)], db.parent, "race", f"sqlite:///{db}", metric, "none")


def _open_after(barrier: Any, db: Path, metric: str, direction: str) -> str:
    barrier.wait()
    try:
        _open_study(
            optuna,
            open_storage(f"sqlite:///{db}"),
            _setup(db, metric),
            direction,
            argparse.Namespace(seed=0, sampler="random"),
        )
    except UsageError as err:
        return str(err)
    return "ok"


def test_workers_starting_together_agree_on_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Several workers open one new study at the same instant: none may see it half-described."""
    set_user_attr = optuna.Study.set_user_attr

    def slow_set_user_attr(self: optuna.Study, key: str, value: Any) -> None:
        set_user_attr(self, key, value)
        time.sleep(0.3)  # widen the window between two writes, were there two

    monkeypatch.setattr(optuna.Study, "set_user_attr", slow_set_user_attr)  # the forked workers inherit it
    db = tmp_path / "study.db"
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):
        db.unlink(missing_ok=True)
        barrier = ctx.Manager().Barrier(4)
        with ctx.Pool(4) as pool:
            outcomes = pool.starmap(_open_after, [(barrier, db, "val/acc", "maximize")] * 4)
        assert outcomes == ["ok"] * 4
    assert _open_after(ctx.Manager().Barrier(1), db, "val/acc", "maximize") == "ok"


@pytest.mark.slow
def test_a_study_made_for_another_metric_is_refused_on_the_command_line(tmp_path: Path):
    db = tmp_path / "search" / "study.db"
    db.parent.mkdir()
    _open_study(optuna, open_storage(f"sqlite:///{db}"), _setup(db, "val_acc"), "maximize",
                argparse.Namespace(seed=0, sampler="random"))  # fmt: skip
    proc = search("--space", DROPOUT, "--trials", "1", "--study", "race", "--output", str(db.parent),
                  "--metric", "val_loss", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: study 'race' in sqlite:///{db} was made for val_acc (maximize) over ['{DROPOUT}']; "
        "pass the same --space/--metric/--direction, or another --study or --output"
    ]
    assert trials_of(db.parent, "race") == [] and sorted(p.name for p in db.parent.iterdir()) == ["study.db"]


def test_bad_input_exits_2_with_one_line_and_no_trial(tmp_path: Path):
    proc = search(
        "--space",
        "model.init_args.dropout=float(0.5)",
        "--trials",
        "2",
        "--output",
        str(tmp_path / "s"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --space 'model.init_args.dropout=float(0.5)': float takes LOW,HIGH and optionally log, e.g. float(1,10,log)"
    ]
    assert not (tmp_path / "s").exists()
    proc = search("--space", DROPOUT, "--trials", "2", "--trial", "3", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and "unknown option '--trial'; overrides for the trials go after `--`" in proc.stderr
    )


def test_help_documents_the_space_syntax():
    out = subprocess.run(
        [sys.executable, "-m", "src.tools.search", "--help"],
        env=env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    for text in (
        "float(LOW,HIGH,log)",
        "int(LOW,HIGH)",
        "choice([512,256],[1024,512])",
        "model.init_args.lr",
        "--pruner",
    ):
        assert text in out


# ---------------------------------------------------------------------- searches (slow)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ("model.init_args.dropoutt=float(0.0,0.5)", [], "the CLI refused model.init_args.dropoutt=0.0: "),
        (
            "model.init_args.bn_position=choice(before_activation,sideways)",
            [],
            "the CLI refused model.init_args.bn_position=sideways: ",
        ),
        (DROPOUT, ["--data.init_args.val_size=0"], "val_size=0: a search needs validation"),
    ],
    ids=["unknown-key", "refused-value", "val_size=0"],
)
def test_specs_the_cli_refuses_stop_before_any_trial(
    space: str, extra: list[str], message: str, tmp_path: Path, cache: Path
):
    out = tmp_path / "s"
    proc = search("--space", space, "--trials", "2", "--output", str(out), *tiny(cache), *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not out.exists()  # no storage, no trial


@pytest.mark.slow
def test_three_trial_search_end_to_end_with_a_pruned_trial(tmp_path: Path, cache: Path):
    out = tmp_path / "search"
    proc = search("--space", LR_CHOICE, "--space", DROPOUT, "--trials", "3", "--study", "e2e",
                  "--output", str(out), *PRUNING, *tiny(cache), cwd=tmp_path)  # fmt: skip
    stdout = ok(proc)
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all("best" in line and "lr=" in line for line in progress)

    trials = trials_of(out, "e2e")
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].params["model.init_args.lr"] == "1.0e-06"
    assert len(trials) == 3 and trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # the value is the best reported val_acc of the trial's epochs (read from the storage)
    assert trials[0].value == max(trials[0].intermediate_values.values())
    assert len(trials[0].intermediate_values) == 2 and len(trials[1].intermediate_values) == 1

    pruned_log = (out / "runs" / "trial_0001" / "trial.log").read_text()
    assert "Optuna pruned this trial after epoch 0" in pruned_log and "Traceback" not in pruned_log
    assert trials[1].user_attrs["exit_code"] == 0  # stopped like an early-stopped run

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows[:2]] == ["COMPLETE", "PRUNED"]
    assert set(rows[0]) >= {
        "trial",
        "state",
        "value",
        "lr",
        "dropout",
        "epochs",
        "duration_s",
        "cpu_s",
        "run_dir",
    }
    assert rows[0]["run_dir"] == "runs/trial_0000" and float(rows[0]["value"]) == pytest.approx(
        trials[0].value
    )
    assert float(rows[0]["duration_s"]) > 0 and float(rows[0]["cpu_s"]) > 0
    table = (out / "trials.md").read_text()
    assert (
        "| 1 | PRUNED |" in table
        and "pruned after epoch 0" in table
        and "Command: `python -m src.tools.search" in table
    )

    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["model"]["init_args"]["dropout"] == pytest.approx(trials[0].params["model.init_args.dropout"])
    assert best["model"]["init_args"]["lr"] == 0.02
    assert best["data"]["init_args"]["num_samples"] == 600  # the overrides after `--` are part of it
    assert not any("search" in c["class_path"] for c in best["trainer"]["callbacks"])
    assert best["trainer"]["logger"]["init_args"]["save_dir"] == "lightning_logs" and best["test_after_fit"]
    assert (out / "history.png").stat().st_size > 0
    if sum(t.state == TrialState.COMPLETE for t in trials) == 2:
        assert (out / "importance.png").stat().st_size > 0
    else:  # trial 2 pruned too: one complete trial has no importances, and the search says so
        assert "info: parameter importance needs 2 complete trials" in stdout

    # every trial is a normal run folder under one TensorBoard root, its searched values in HPARAMS
    for t in trials:
        run = out / t.user_attrs["run_dir"]
        assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
        keys = hparams_keys(run)
        assert {"dropout", "lr", "optimizer", "data/batch_size"} <= keys  # HParamsTab logs them


@pytest.mark.slow
def test_killed_search_resumes_with_the_same_command(tmp_path: Path, cache: Path):
    out = tmp_path / "search"

    def args(trials: int) -> list[str]:
        return ["--space", DROPOUT, "--space", "model.init_args.bn_position=choice(before_activation,after_activation)",
                "--trials", str(trials),
                "--study", "resume", "--output", str(out), "--seed", "0", *tiny(cache, epochs=5)]  # fmt: skip

    proc = start(*args(2), cwd=tmp_path)
    log = out / "runs" / "trial_0001" / "trial.log"
    deadline = time.monotonic() + 300
    try:  # SIGKILL the search while trial 1 trains (after trial 0 finished)
        while "Effective batch size" not in (log.read_text() if log.is_file() else ""):
            assert proc.poll() is None, f"the search ended first:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "trial 1 never started training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    # the orphaned trial notices its search is gone and kills its own process group
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(out)):
        assert time.monotonic() < deadline, "the killed search's trial kept running"
        time.sleep(0.2)
    before = trials_of(out, "resume")
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]

    stdout = ok(search(*args(2), cwd=tmp_path))
    assert "trials [1] were left running by a search that stopped: marked FAIL, run again" in stdout
    trials = trials_of(out, "resume")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].value == before[0].value  # kept, not run again
    assert trials[2].params == trials[1].params  # the killed trial, run again with its values
    assert trials[2].system_attrs["retry_history"] == [1]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert rows[1]["note"] == "its search process died while it ran; run again as trial 2"
    assert rows[2]["note"] == "runs trial 1 again"
    assert "2 trials counted" in (out / "trials.md").read_text()

    # the same command with a larger --trials adds trials to the study
    assert "2 of 3 trials counted" in ok(search(*args(3), cwd=tmp_path))
    trials = trials_of(out, "resume")
    assert [t.state for t in trials_of(out, "resume")] == [TrialState.COMPLETE, TrialState.FAIL] + [
        TrialState.COMPLETE
    ] * 2


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_two_workers_share_one_study_and_its_budget(tmp_path: Path, cache: Path):
    out = tmp_path / "search"
    args = ["--space", DROPOUT, "--trials", "4", "--study", "shared", "--output", str(out), *tiny(cache)]
    workers = [start(*args, cwd=tmp_path) for _ in range(2)]
    results = [w.communicate(timeout=400) for w in workers]
    for w, (_stdout, stderr) in zip(workers, results, strict=True):
        assert w.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    trials = trials_of(out, "shared")
    # Each worker checks the budget right before it asks for a trial: the total exceeds it only
    # if both asked within the same few milliseconds (then by one trial per extra worker).
    assert len(trials) in (4, 5), [t.state for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers ran trials
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes")
def test_ddp_trial_reports_from_rank_0_and_all_ranks_stop_together(tmp_path: Path, cache: Path):
    out = tmp_path / "search"
    # One trial at a peak LR of 1e-6 (chance accuracy): the threshold pruner stops it after epoch 0.
    proc = search("--space", DROPOUT, "--trials", "1", "--study", "ddp", "--output", str(out),
                  "--pruner", "threshold(lower=0.5)", *tiny(cache), "--model.init_args.lr=1e-6",
                  "--trainer.devices=2", "--trainer.strategy=ddp", cwd=tmp_path)  # fmt: skip
    # its only trial pruned, the study has no complete trial: exit 1, saying so
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: no trial completed; see trials.md and the trials' trial.log"
    (trial,) = trials_of(out, "ddp")
    assert trial.state == TrialState.PRUNED and trial.user_attrs["exit_code"] == 0
    assert list(trial.intermediate_values) == [0]  # one report per epoch, from rank 0 only
    log = (out / "runs" / "trial_0000" / "trial.log").read_text()
    assert "Starting with 2 processes" in log and "Traceback" not in log
    assert log.count("Optuna pruned this trial") == 1
