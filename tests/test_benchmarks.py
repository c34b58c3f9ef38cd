"""The benchmark code on tiny data: the hand loop and its clock, the runner, the speed comparison, the
results tables, the device check's dry run (what CI runs in place of the GPU), and the behaviour the
speed work must keep (FaultTolerance's non-finite stop)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import loops, runner, speed
from src.runtime.fault_tolerance import FaultTolerance, NonFiniteLossError
from tests.helpers.cli import ROOT, env
from tests.helpers.data import TINY_DATA


def tiny(name: str, tmp_path: Path) -> list[str]:
    """The tiny-data flags of a pair, with its logs under ``tmp_path``."""
    flags = TINY_DATA[runner.data_class(runner.PAIRS[name].config)](tmp_path)
    return [*flags, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]


# ---------------------------------------------------------------------------------------- the loop
def test_clock_keeps_evaluations_out_of_the_epochs_and_times_the_target(monkeypatch):
    now = [100.0]  # a fake clock: the figures are exact whatever the machine's load

    def advance(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(loops.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(loops.time, "process_time", lambda: now[0])
    clock = loops.Clock(target=0.5)
    accs = iter([0.2, 0.7])

    def slow_eval() -> float:
        advance(0.2)
        return next(accs)

    for _ in range(2):
        clock.epoch_start(slow_eval)
        advance(0.01)
        clock.train_end()
    clock.finish(slow_eval)
    assert clock.epochs == 2 and clock.accs == [0.2, 0.7]
    assert clock.epoch_times() == pytest.approx([0.01, 0.01])
    assert clock.time_to_target == pytest.approx(0.02)  # the end of the second epoch, evaluations not counted


def test_hand_loop_trains_the_configs_network_on_its_tensors(tmp_path: Path):
    cli = runner.build(runner.PAIRS["mnist1d_resnet_bn"].config, tiny("mnist1d_resnet_bn", tmp_path))
    before = [p.detach().clone() for p in cli.model.net.parameters()]
    clock = loops.hand_loop(cli.model, cli.datamodule, loops.LoopOptions(epochs=2), cli.config, evaluate=True)
    assert clock.epochs == 2 and len(clock.epoch_times()) == 2 and len(clock.train_times()) == 2
    assert len(clock.accs) == 2 and all(0 <= a <= 1 for a in clock.accs)
    assert any(not torch.equal(a, b) for a, b in zip(before, cli.model.net.parameters(), strict=True))


def test_seed_style_is_the_same_loop_with_a_dataloader_and_a_read_per_step(tmp_path: Path, monkeypatch):
    cli = runner.build(runner.PAIRS["mnist1d_resnet_bn"].config, tiny("mnist1d_resnet_bn", tmp_path))
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    options = loops.seed_style(1, runner.PAIRS["mnist1d_resnet_bn"].seed_optimizer)
    assert options.per_sample and options.batch_size == 32 and not options.recipe
    loops.hand_loop(cli.model, cli.datamodule, options, cli.config)
    steps = math.ceil(len(cli.datamodule.splits["train"][0]) / 32)
    assert steps <= len(reads) <= steps + 2  # a loss.item() per step (SGD reads nothing itself)


def test_ema_decay_is_read_from_the_config_and_the_text_loop_runs_ema_and_mixup(tmp_path: Path):
    cli = runner.build(runner.PAIRS["ag_news_cnn_bn"].config, tiny("ag_news_cnn_bn", tmp_path))
    assert loops.ema_settings(cli.config) == {"decay": 0.995, "update_every_n_steps": 1, "use_buffers": True}
    assert cli.model.hparams.mixup_alpha > 0
    clock = loops.hand_loop(cli.model, cli.datamodule, loops.LoopOptions(epochs=1), cli.config)
    assert clock.epochs == 1
    fashion = runner.build(
        runner.PAIRS["fashion_mnist_mlp_bn"].config, tiny("fashion_mnist_mlp_bn", tmp_path)
    )
    assert loops.ema_settings(fashion.config) is None


# ---------------------------------------------------------------------------------------- speed
def test_speed_measures_project_bare_trainer_and_hand_loop_side_by_side(tmp_path: Path):
    pair = runner.PAIRS["mnist1d_resnet_bn"]
    r = speed.per_epoch(
        pair,
        epochs=2,
        repeats=1,
        save_dir=str(tmp_path / "speed"),
        extra=tiny("mnist1d_resnet_bn", tmp_path),
        echo=False,
    )
    for side in speed.SIDES:
        assert r[f"{side}_s"] > 0 and r[f"{side}_samples_per_s"] > 0
    assert r["a_over_a0"] > 0 and r["a_over_b"] > 0 and r["startup_s"] > 0 and r["steps_per_epoch"] > 0
    lines = speed.verdicts("mnist1d_resnet_bn", r)
    assert lines[0].startswith("a/a0 <= 1.10") and "a/b" in lines[1]
    assert speed.verdicts("mnist1d_resconv_bn", r)[0].startswith("a/a0 <= 1.05")
    assert len(speed.table([("mnist1d_resnet_bn", r)])) == 3


# ---------------------------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def results_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m benchmarks.results`` on MNIST-1D, one seed, 2 epochs: its output and its runs' folder.
    Each of its two variants is a :func:`benchmarks.runner.fit` (``python -m src.cli fit`` in a subprocess)."""
    tmp_path = tmp_path_factory.mktemp("results")
    flags = TINY_DATA["MNIST1D"](tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.results", "--pair", "mnist1d_resnet_bn", "--seeds", "1",
         "--save-dir", str(tmp_path / "runs"), "--", *flags, "--trainer.max_epochs=2"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out, tmp_path / "runs"


@pytest.mark.slow
def test_runner_fits_through_the_cli_and_reads_the_run_folder(results_run):
    out, runs = results_run
    (save_dir,) = runs.glob("*/bn_on/seed0")  # runner.fit's save_dir: <save-dir>/<time>/<variant>/seed<n>
    r = runner.figures(runner.run_folder(save_dir))
    assert 0 <= r["test_acc"] <= 1 and 0 <= r["test_f1"] <= 1 and 0 <= r["best_val_acc"] <= 1
    assert r["epochs"] == 2 and len(r["val_acc_per_epoch"]) == 2 and "last.ckpt" in r["checkpoints"]
    assert Path(r["run_dir"]).is_dir()
    # the command's wall and CPU time, as the runner measured them
    line = next(line for line in out.stdout.splitlines() if line.startswith("bn_on") and " seed 0:" in line)
    wall, cpu = re.search(r"wall (\S+)s\s+CPU (\S+)s", line).groups()
    assert float(wall) > 0 and float(cpu) > 0 and "epochs   2" in line


@pytest.mark.slow
def test_results_prints_the_table_of_its_variants(results_run):
    out, _ = results_run
    rows = [line for line in out.stdout.splitlines() if line.startswith("| bn_")]
    assert [r.split("|")[1].strip() for r in rows] == ["bn_on", "bn_off"]
    lines = out.stdout.splitlines()  # what the docs quote: the command, the load, the goal
    assert lines[0].startswith("command: ") and "--pair mnist1d_resnet_bn --seeds 1" in lines[0]
    assert any(line.startswith("load average at the end") for line in lines)
    assert any(line.startswith("Goal (bn_on): mean test acc >= 0.85") for line in lines)


# ---------------------------------------------------------------------------------------- device check
@pytest.mark.slow
def test_device_check_dry_run_writes_its_report(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), str(out), "--dry-run", "--budget-s", "1200"],
        cwd=ROOT, env={**env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "cli_runs.csv",
        "device_check.json",
        "device_check.log",
        "device_check.md",
        "pytest_gpu.log",
        "speed.csv",
    ]
    assert len(names) <= 8  # what the device tool brings back
    report = json.loads((out / "device_check.json").read_text())
    assert report["dry_run"] and "skipped" in report["pytest"]["summary"]  # GPU tests skip on a CPU
    statuses = {(r["pair"], r["precision"]): r["status"] for r in report["cli"]}
    assert len(statuses) == 8 and set(statuses.values()) == {"ok"}, statuses
    assert all(res["per_epoch"] and "to_target" in res for res in report["speed"].values()), report["speed"]
    md = (out / "device_check.md").read_text()
    for heading in ("## 1. pytest -m gpu", "## 2.", "## 3. Speed", "## Verdicts"):
        assert heading in md


def test_device_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device", "--output", str(tmp_path)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--dry-run" in proc.stdout


# ---------------------------------------------------------------------------------------- kept behaviour
def _trainer(step: int, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, current_epoch=epoch, world_size=1, checkpoint_callbacks=[])


def test_non_finite_loss_is_found_at_the_checks_and_named_by_its_first_step(monkeypatch):
    ft = FaultTolerance(check_every_n_steps=5)
    reads = []
    real_nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda self, *a, **k: reads.append(1) or real_nonzero(self, *a, **k)
    )
    for step in (1, 2):
        ft.on_train_batch_end(_trainer(step), None, {"loss": torch.tensor(0.5)}, None, step)
    for step in (3, 4):  # bad, but not read until the check at step 5
        ft.on_train_batch_end(
            _trainer(step, epoch=1),
            None,
            torch.tensor(float("nan") if step == 3 else float("inf")),
            None,
            step,
        )
    assert reads == []  # nothing read on the device between checks
    with pytest.raises(NonFiniteLossError, match=r"at training step 3 \(epoch 1\)"):
        ft.on_train_batch_end(_trainer(5, epoch=1), None, torch.tensor(0.1), None, 5)
    assert reads == [1]  # one read for the five losses
    with pytest.raises(NonFiniteLossError, match="step 3"):  # and before any later checkpoint
        ft.on_save_checkpoint(
            SimpleNamespace(world_size=1, state=SimpleNamespace(fn="fit"), checkpoint_callbacks=[]), None, {}
        )


def test_finite_losses_pass_every_check():
    ft = FaultTolerance(check_every_n_steps=2)
    for step in range(1, 8):
        ft.on_train_batch_end(_trainer(step), None, {"loss": torch.tensor(float(step))}, None, step)
    ft.on_train_epoch_end(SimpleNamespace(world_size=1, global_step=7), None)
    ft.stop_if_nonfinite(_trainer(7))


@pytest.mark.slow
def test_speed_command_prints_its_tables_and_writes_json(tmp_path: Path):
    # 150 signals (2 training steps per epoch): its (c) run trains the notebook's 60 epochs on them
    flags = [*tiny("mnist1d_resnet_bn", tmp_path), "--data.init_args.num_samples=150"]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--pairs", "mnist1d_resnet_bn", "--epochs", "2", "--repeats", "1",
         "--json", str(tmp_path / "speed.json"), "--", *flags, "--trainer.max_epochs=2"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "# Summary" in out.stdout
        and "a/a0 <= 1.10" in out.stdout
        and "| mnist1d_resnet_bn | (c) |" in out.stdout
    )
    # the command and the machine's load, at the start and again at the end
    assert out.stdout.startswith(
        "command: BN_NUM_THREADS=1 python -m benchmarks.speed --pairs mnist1d_resnet_bn"
    )
    assert out.stdout.count("command: ") == 2 and "load average at the start" in out.stdout
    assert "load average at the end" in out.stdout
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["import_s"] > 0 and report["pairs"]["mnist1d_resnet_bn"]["verdicts"]
    # the time to target runs all three loops: (a) and (b) as the CLI's max_epochs says, (c) the notebook's
    full = report["pairs"]["mnist1d_resnet_bn"]["to_target"]
    assert full["a"]["epochs"] == full["b"]["epochs"] == 2
    assert full["c"]["epochs"] == runner.PAIRS["mnist1d_resnet_bn"].seed_epochs
    assert full["a"]["startup_s"] > 0 and len(full["a"]["accs"]) == 2
    assert all(f"| mnist1d_resnet_bn | ({side}) | " in out.stdout for side in "abc")


# ---------------------------------------------------------------------------------------- hooks.py
def test_hook_times_are_summed_per_callback_class_and_hook_per_epoch():
    from benchmarks.hooks import per_epoch

    durations = {
        "run_training_epoch": [0.1, 0.3],
        "save_checkpoint": [0.01, 0.01, 0.02],
        "[Callback]ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}.on_train_epoch_end": [0.01, 0.01],
        "[Callback]ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}.on_train_epoch_end": [0.002, 0.002],
        "[Callback]RunConfig.on_fit_start": [0.05],
        "[LightningModule]ResidualBN.training_step": [0.5],  # not a callback: left out
    }
    epochs, epoch_ms, recurring, once = per_epoch(durations)
    assert epochs == 2 and math.isclose(epoch_ms, 200.0)
    assert recurring.keys() == {"save_checkpoint", "ModelCheckpoint.on_train_epoch_end"}
    assert math.isclose(recurring["save_checkpoint"], 20.0)
    assert math.isclose(recurring["ModelCheckpoint.on_train_epoch_end"], 12.0)
    assert once.keys() == {"RunConfig.on_fit_start"} and math.isclose(once["RunConfig.on_fit_start"], 50.0)


@pytest.mark.slow
def test_hooks_command_prints_the_callback_hooks_of_a_real_fit_of_a_pair_added_as_readme_says(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.hooks", "--config", "tests/pair/toy.yaml", "--epochs", "2", "--",
         *TINY_DATA["ToyBlobs"](tmp_path)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stdout.startswith("command: python -m benchmarks.hooks --config tests/pair/toy.yaml")
    assert "load average at the start" in out.stdout and "toy: 2 epochs, a training epoch" in out.stdout
    assert "| save_checkpoint |" in out.stdout and "| LastCheckpoint.on_train_epoch_end |" in out.stdout
    assert "| RunConfig.on_fit_start |" in out.stdout  # a hook of the run's start, in the second table


@pytest.mark.slow
def test_hooks_command_refuses_bad_input_saying_what_to_do(tmp_path: Path):
    def hooks(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.hooks", *args],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
        )

    for args, message in (
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--config", str(tmp_path / "none.yaml")], "none.yaml: no such file"),
        (
            ["--epochs", "1", "--", "--trainer.max_epoch=1"],
            "unknown option --trainer.max_epoch. Did you mean --trainer.max_epochs",
        ),
    ):
        out = hooks(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr[-3000:])
        assert message in out.stderr, (args, out.stderr[-3000:])
