"""src.tools.search: space specs, pruner specs, the trial budget, and real (tiny) searches as a user runs them.

The searches run ``python -m src.tools.search`` in a subprocess on MNIST-1D with 600 samples and two
epochs per trial, so each trial is a few seconds of training after a few seconds of start-up.
"""

from __future__ import annotations

import csv
import json
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

from src.runtime.errors import UsageError  # noqa: E402
from src.tools.ablate import split_top_level  # noqa: E402
from src.tools.child_run import into_folder  # noqa: E402
from src.tools.search.space import baseline_params, build_pruner, labels, parse_space  # noqa: E402
from src.tools.search.study import (  # noqa: E402
    contract_differences,
    open_storage,
    open_study,
    rerun_of,
    trial_config,
    within_budget,
)
from tests.helpers.cli import ROOT  # noqa: E402

CONFIG = str(ROOT / "configs" / "mnist1d_resnet_bn.yaml")
# One-cycle peak LR: 0.02 learns, 1e-6 stays at chance (a clearly bad trial for the pruner).
LR_CHOICE = "model.init_args.lr=choice(0.02,1.0e-06)"
DROPOUT = "model.init_args.dropout=float(0.0,0.5)"
# RandomSampler(seed=6) draws lr 0.02, 1e-6 for the first two trials (with the dropout drawn after
# it in each trial): trial 1 is the bad one.
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
    config = {  # a resolved config's settings, as the CLI prints them
        "model": {"init_args": {"hidden_sizes": [512, 256], "dropout": 0.3, "lr": 0.01}},
        "data": {"init_args": {"batch_size": 256, "hflip": False}},
    }
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
    assert type(build_pruner("median(n_startup_trials=2,n_warmup_steps=3)")).__name__ == "MedianPruner"
    assert type(build_pruner("halving(min_resource=2)")).__name__ == "SuccessiveHalvingPruner"
    assert type(build_pruner("none")).__name__ == "NopPruner"
    assert type(build_pruner("threshold(lower=0.5)")).__name__ == "ThresholdPruner"
    for bad in ("medain", "median(n_startup_trials)", "median(bogus=1)", "median(n_startup_trials=-1"):
        with pytest.raises(UsageError, match="--pruner"):
            build_pruner(bad)


def test_the_budget_is_the_first_trials_by_number_finished_or_running():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.PRUNED, TrialState.RUNNING]
    for state in states:
        study.add_trial(optuna.trial.create_trial(state=state, params={"x": 0.5}, distributions=dist,
                                                  value=0.5 if state == TrialState.COMPLETE else None))  # fmt: skip
    # counted: 0, 2 (running), 3, 4; the failed trial 1 uses no budget
    assert [within_budget(study, n, 3) for n in range(5)] == [True, True, True, True, False]
    assert within_budget(study, 4, 4)
    # a failed trial run again: the re-run (enqueued with its retry history) replaces it in the table
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params={"x": 0.5}, distributions=dist,
                                              system_attrs={"failed_trial": 1, "retry_history": [1]}))  # fmt: skip
    assert rerun_of(study.get_trials()) == {1: 5}


def _contract(metric: str = "val_acc", space: list[str] | None = None, epochs: int = 2) -> dict[str, Any]:
    config = {"trainer": {"max_epochs": epochs}, "data": {"init_args": {"data_dir": "/a", "batch_size": 32}}}
    return {"config": trial_config(config, ["data_dir"]), "overrides": [f"--trainer.max_epochs={epochs}"],
            "space": sorted(space or [DROPOUT]), "metric": metric, "direction": "maximize", "command": "c"}  # fmt: skip


def test_a_study_contract_compares_what_defines_a_trial():
    two = [DROPOUT, LR_CHOICE]
    assert (
        contract_differences(_contract(space=two), _contract(space=two[::-1])) == []
    )  # a set: order is free
    # where the data is read from (a DataModule's resumable option) does not define a trial
    assert trial_config({"data": {"init_args": {"data_dir": "/b", "x": 1}}}, ["data_dir"]) == {
        "data": {"init_args": {"x": 1}}
    }
    assert contract_differences(_contract(), _contract(epochs=3, metric="val_loss", space=two)) == [
        f"--space: ['{DROPOUT}'] -> {sorted(two)}",
        "--metric: val_acc -> val_loss",
        "trainer.max_epochs: 2 -> 3",
        "overrides after `--`: --trainer.max_epochs=2 -> --trainer.max_epochs=3",
    ]


def _open_after(barrier: Any, db: Path, metric: str) -> str:
    barrier.wait()
    try:
        open_study(open_storage(f"sqlite:///{db}"), f"sqlite:///{db}", "race", _contract(metric))
    except UsageError as err:
        return str(err).splitlines()[0]
    return "ok"


def test_workers_starting_together_agree_on_the_study(tmp_path: Path):
    """Several workers open one new study at the same instant: one creates it, all agree on it."""
    db = tmp_path / "study.db"
    ctx = multiprocessing.get_context("fork")
    for _ in range(2):
        db.unlink(missing_ok=True)
        barrier = ctx.Manager().Barrier(4)
        with ctx.Pool(4) as pool:
            outcomes = pool.starmap(_open_after, [(barrier, db, "val_acc")] * 4)
        assert outcomes == ["ok"] * 4
    refused = _open_after(ctx.Manager().Barrier(1), db, "val_loss")
    assert (
        refused
        == f"study 'race' in sqlite:///{db} holds trials of another experiment; this command differs in:"
    )


def test_each_logger_with_a_save_dir_writes_into_the_runs_folder(tmp_path: Path):
    tb = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "n"},
    }
    other = {"class_path": "some.Logger", "init_args": {"api_key": "k"}}
    assert into_folder({"logger": False}, tmp_path) == [f"--trainer.default_root_dir={tmp_path}"]
    single = into_folder({"logger": tb}, tmp_path)[1]
    assert json.loads(single.removeprefix("--trainer.logger="))["init_args"] == {
        "save_dir": str(tmp_path),
        "name": "n",
    }
    both = json.loads(into_folder({"logger": [tb, other]}, tmp_path)[1].removeprefix("--trainer.logger="))
    assert [lg["init_args"].get("save_dir") for lg in both] == [str(tmp_path), None] and both[1] == other


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


def test_the_search_process_imports_neither_torch_nor_lightning():
    """Only the trials and the CLI's parser need them: every search (and worker) starts without them."""
    code = (
        "import sys, src.tools.search.__main__, src.tools.search.run; "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


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


# Two loggers, TensorBoard and CSV: the search puts both into each trial's folder and reads its
# results from the study's storage, not from either logger's files.
TWO_LOGGERS = "--trainer.logger=" + json.dumps(
    [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"name": "tb"}},
     {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "tb"}}]
)  # fmt: skip


def e2e_args(out: Path, cache: Path, trials: int = 2, epochs: int = 2) -> list[str]:
    return ["--space", LR_CHOICE, "--space", DROPOUT, "--trials", str(trials), "--study", "e2e",
            "--output", str(out), *PRUNING, *tiny(cache, epochs), TWO_LOGGERS]  # fmt: skip


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, str]:
    """A two-trial study (the second pruned) and what its search printed."""
    out = tmp_path_factory.mktemp("e2e") / "search"
    return out, ok(search(*e2e_args(out, cache), cwd=out.parent))


@pytest.mark.slow
def test_two_trial_search_end_to_end_with_a_pruned_trial(e2e: tuple[Path, str]):
    out, stdout = e2e
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and all("best" in line and "lr=" in line for line in progress)

    trials = trials_of(out, "e2e")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].params["model.init_args.lr"] == "1.0e-06"
    # the value is the best reported val_acc of the trial's epochs (read from the storage)
    assert trials[0].value == max(trials[0].intermediate_values.values())
    assert len(trials[0].intermediate_values) == 2 and len(trials[1].intermediate_values) == 1

    pruned_log = (out / "runs" / "trial_0001" / "trial.log").read_text()
    assert "Optuna pruned this trial after epoch 0" in pruned_log and "Traceback" not in pruned_log
    assert trials[1].user_attrs["exit_code"] == 0  # stopped like an early-stopped run

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows[:2]] == ["COMPLETE", "PRUNED"]
    assert list(rows[0]) == [
        "trial",
        "state",
        "value",
        "lr",
        "dropout",
        "epochs",
        "duration_s",
        "cpu_s",
        "run_dir",
        "note",
    ]
    assert rows[0]["run_dir"] == "runs/trial_0000/tb/version_0"
    assert float(rows[0]["value"]) == pytest.approx(trials[0].value)
    assert float(rows[0]["duration_s"]) > 0 and float(rows[0]["cpu_s"]) > 0
    table = (out / "trials.md").read_text()
    assert "| 1 | PRUNED |" in table and "pruned after epoch 0" in table
    assert f"Command: `python -m src.tools.search --config {CONFIG} --space '{LR_CHOICE}'" in table

    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["model"]["init_args"]["dropout"] == pytest.approx(trials[0].params["model.init_args.dropout"])
    assert best["model"]["init_args"]["lr"] == 0.02
    assert best["data"]["init_args"]["num_samples"] == 600  # the overrides after `--` are part of it
    assert not any("search" in c["class_path"] for c in best["trainer"]["callbacks"])
    # logging as the command's own config says (not into the trial's folder); testing as configs/ do
    assert [lg["init_args"]["save_dir"] for lg in best["trainer"]["logger"]] == ["lightning_logs"] * 2
    assert best["test_after_fit"] is True
    # how to re-train and test it over seeds (the final step: src.tools.ablate)
    final = out / "final"
    ablate = f"python -m src.tools.ablate --config {out / 'best_config.yaml'} --seeds 3 --output {final}"
    assert f"{ablate} --runs_dir {final}/runs\n" in stdout

    # every trial is a normal run folder with both loggers' files, its searched values in HPARAMS
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert run.parent.parent == out / "runs" / f"trial_{t.number:04d}"
        assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
        assert (run / "metrics.csv").is_file()  # CSVLogger's
        assert {"dropout", "lr", "optimizer", "data/batch_size"} <= hparams_keys(run)  # HParamsTab's


@pytest.mark.slow
def test_a_resume_must_be_the_same_experiment(e2e: tuple[Path, str], cache: Path):
    """Another config (stacked on the study's) and other overrides after `--` would add trials of
    another experiment to the study: refused, listing each difference, with nothing written. The same space in another order
    is the same study."""
    out, _ = e2e
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    conv = out.parent / "conv.yaml"  # a config stacked on the study's, outside the search's folder
    conv.write_text("model:\n  init_args:\n    block: conv\n")
    other = command("--config", str(conv), *e2e_args(out, cache, epochs=3))
    proc = subprocess.run(other, cwd=out.parent, env=env(), capture_output=True, text=True, timeout=400)
    said = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert said.startswith(
        f"error: study 'e2e' in sqlite:///{out / 'study.db'} holds trials of another experiment"
    )
    for difference in ("model.init_args.block: 'linear' -> 'conv'", "trainer.max_epochs: 2 -> 3"):
        assert f"  {difference}\n" in said, said
    assert "  overrides after `--`: --trainer.max_epochs=2 -> --trainer.max_epochs=3\n" in said, said
    assert "Resume it with the study's settings" in said
    assert f"The study's command: python -m src.tools.search --config {CONFIG} --space '{LR_CHOICE}'" in said
    assert len(trials_of(out, "e2e")) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing written

    # the same space in another order, and a larger budget: one more trial in the same study
    space_swapped = ["--space", DROPOUT, "--space", LR_CHOICE, *e2e_args(out, cache, trials=3)[4:]]
    stdout = ok(search(*space_swapped, cwd=out.parent))
    trials = trials_of(out, "e2e")
    assert "2 of 3 trials counted" in stdout and len(trials) == 3
    # trials.md shows the command that made the study
    assert (
        f"Command: `python -m src.tools.search --config {CONFIG} --space '{LR_CHOICE}'"
        in (out / "trials.md").read_text()
    )


@pytest.mark.slow
def test_interrupted_and_killed_searches_resume_with_the_same_command(tmp_path: Path, cache: Path):
    out = tmp_path / "search"
    args = [
        "--space",
        DROPOUT,
        "--trials",
        "1",
        "--study",
        "resume",
        "--output",
        str(out),
        *tiny(cache, epochs=5),
    ]

    # SIGTERM while trial 0 trains: the search stops it, marks it FAIL and enqueues it again
    proc = start(*args, cwd=tmp_path)
    _wait_for_training(proc, out / "runs" / "trial_0000" / "trial.log")
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: trial 0 stopped; the same command runs it again"
    assert [t.state for t in trials_of(out, "resume")] == [TrialState.FAIL, TrialState.WAITING]

    # the same command runs it again; SIGKILL meanwhile: the orphaned trial kills its own process group
    proc = start(*args, cwd=tmp_path)
    try:
        _wait_for_training(proc, out / "runs" / "trial_0001" / "trial.log")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(out)):
        assert time.monotonic() < deadline, "the killed search's trial kept running"
        time.sleep(0.2)
    assert [t.state for t in trials_of(out, "resume")] == [TrialState.FAIL, TrialState.RUNNING]

    stdout = ok(search(*args, cwd=tmp_path))
    assert "trials [1] were left running by a search that stopped: marked FAIL, run again" in stdout
    trials = trials_of(out, "resume")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params == trials[0].params  # the same values each time
    assert trials[2].system_attrs["retry_history"] == [0, 1]
    notes = [r["note"] for r in csv.DictReader((out / "trials.csv").open())]
    assert notes == [
        "stopped with the interrupted search; run again as trial 1",
        "its search process died while it ran; run again as trial 2",
        "runs trial 1 again",
    ]
    assert "1 trials counted" in (out / "trials.md").read_text()


def _wait_for_training(proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while "Effective batch size" not in (log.read_text() if log.is_file() else ""):
        assert proc.poll() is None, f"the search ended first:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{log.parent.name} never started training"
        time.sleep(0.05)


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
def test_failed_trials_are_recorded_and_max_failures_in_a_row_stop_the_search(tmp_path: Path):
    out = tmp_path / "search"
    # The parser takes any folder; each run then refuses to write its data cache there (exit 2).
    space = "data.init_args.cache_dir=choice(/proc/nowhere/a,/proc/nowhere/b)"
    proc = search("--space", space, "--trials", "3", "--max_failures", "2", "--output", str(out), "--",
                  "--data.init_args.num_samples=400", "--trainer.max_epochs=1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = proc.stderr.strip().splitlines()
    assert error.startswith(
        "error: 2 trials in a row failed; the last: exit 2: error: cannot write the data cache"
    )
    assert error.endswith(f"(its output: {out / 'runs' / 'trial_0001' / 'trial.log'})")
    trials = trials_of(out, "mnist1d_resnet_bn")
    assert [t.state for t in trials] == [TrialState.FAIL] * 2  # failures use no budget: the limit stopped it
    assert all(t.user_attrs["exit_code"] == 2 and "cannot write" in t.user_attrs["error"] for t in trials)
    notes = [r["note"] for r in csv.DictReader((out / "trials.csv").open())]
    assert all(n.startswith("exit 2: error: cannot write the data cache") for n in notes)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes")
def test_ddp_trial_without_a_logger_reports_from_rank_0_and_all_ranks_stop_together(
    tmp_path: Path, cache: Path
):
    out = tmp_path / "search"
    # One trial at a peak LR of 1e-6 (chance accuracy): the threshold pruner stops it after epoch 0.
    proc = search("--space", DROPOUT, "--trials", "1", "--study", "ddp", "--output", str(out),
                  "--pruner", "threshold(lower=0.5)", *tiny(cache), "--model.init_args.lr=1e-6",
                  "--trainer.logger=false", "--trainer.devices=2", "--trainer.strategy=ddp", cwd=tmp_path)  # fmt: skip
    # its only trial pruned, the study has no complete trial: exit 1, saying so
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: no trial completed; see trials.md and the trials' trial.log"
    (trial,) = trials_of(out, "ddp")
    assert trial.state == TrialState.PRUNED and trial.user_attrs["exit_code"] == 0
    assert list(trial.intermediate_values) == [0]  # one report per epoch, from rank 0 only
    # no logger: the run folder the CLI makes in the trial's folder (its default_root_dir)
    assert trial.user_attrs["run_dir"] == str(out / "runs" / "trial_0000" / "lightning_logs" / "version_0")
    log = (out / "runs" / "trial_0000" / "trial.log").read_text()
    assert "Starting with 2 processes" in log and "Traceback" not in log
    assert log.count("Optuna pruned this trial") == 1
