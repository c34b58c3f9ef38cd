"""The device check: everything a GPU should confirm, in one command that fits about 8 minutes.

    bash scripts/device_check.sh OUTDIR                    # on the GPU machine (installs the carried wheels)
    python -m benchmarks.device --output OUTDIR --dry-run   # the same code path on CPU, tiny data (CI)

Parts, each stopped at its share of ``--budget-s`` (what is left undone is listed as skipped):

1. ``pytest -m gpu`` (``tests/test_gpu.py``);
2. every config for a few epochs through the CLI in ``32-true`` and ``bf16-mixed``: ``fit`` with
   the test after fit (the best checkpoint), then ``predict`` from that checkpoint in a new command;
3. per pair, the project (a), a bare Trainer (a0) and the hand loop (b) at the config's batch size
   and at a large one: s/epoch, samples/s, peak GPU memory (``torch.cuda.max_memory_allocated``),
   and full-length runs of (a) and (b) for the time to the target accuracies;
4. writes ``device_check.md`` (the tables and verdicts), ``device_check.json`` (every figure),
   ``speed.csv``, ``cli_runs.csv`` and ``pytest_gpu.log`` into ``--output``.

Data never comes from the network: ``--data-dir`` (default ``.devdata`` when it exists, as
``scripts/prepare_wheels.sh`` fills it, else ``$BN_DATA_DIR``) holds the parquet copies and the
MNIST-1D cache; the dry run writes tiny stand-ins (``tests/helpers/data.py``) instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"pytest": 0.3, "cli": 0.25, "speed": 0.45}  # of the budget; unused time passes on
# The pairs with GPU goals first (Fashion-MNIST to 0.90 in 5 s, an AG News epoch in 1 s), so a
# tight budget cuts the others.
SPEED_ORDER = ("fashion_mnist_mlp_bn", "ag_news_cnn_bn", "mnist1d_resconv_bn", "mnist1d_resnet_bn")
LARGE_BATCH = {
    "mnist1d_resnet_bn": 1000,
    "mnist1d_resconv_bn": 1000,
    "fashion_mnist_mlp_bn": 2048,
    "ag_news_cnn_bn": 512,
}
PRECISIONS = ("32-true", "bf16-mixed")


class Budget:
    """Seconds left for the whole check and for the part running now."""

    def __init__(self, total: float) -> None:
        self.start = time.perf_counter()
        self.total = total
        self.part_end = self.start

    def begin(self, share: float) -> None:
        """Start a part that gets ``share`` of what is left (earlier parts' unused time passes on)."""
        left = self.total - self.elapsed()
        self.part_end = time.perf_counter() + max(0.0, left * share)

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log(msg: str) -> None:
    print(f"[device {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- setup
def environment(device: str) -> dict[str, Any]:
    """What the check runs on: versions, the GPU, and which optional packages import."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    for name in (
        "lightning",
        "torchmetrics",
        "jsonargparse",
        "datasets",
        "mnist1d",
        "pyarrow",
        "tensorboard",
    ):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except Exception as err:  # a missing or broken wheel: reported, the parts that need it fail
            info[name] = f"missing ({type(err).__name__}: {err})"[:200]
    return info


def pair_flags(dry_run: bool, data_dir: Path, work: Path) -> dict[str, list[str]]:
    """Per pair, the flags that point its config at the local data and at caches under ``work``."""
    from benchmarks.runner import PAIRS, local_data

    flags = {}
    if dry_run:
        from benchmarks.runner import data_class
        from tests.helpers.data import TINY_DATA

        for name, pair in PAIRS.items():
            flags[name] = TINY_DATA[data_class(pair.config)](work / "tiny" / name)
        return flags
    for name, pair in PAIRS.items():
        cache = data_dir / "mnist1d" if "mnist1d" in name else work / "cache" / name
        flags[name] = [*local_data(pair.config, data_dir), f"--data.init_args.cache_dir={cache}"]
    return flags


# ---------------------------------------------------------------------------------------- parts
def part_pytest(out: Path, budget: Budget) -> dict[str, Any]:
    """``pytest -m gpu``; its output goes to ``pytest_gpu.log``."""
    timeout = max(30.0, budget.left())
    # -v: a line per test as it ends, so a run stopped at the budget still shows how far it got.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-rfEsxX",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
    ]
    log(f"pytest -m gpu (at most {timeout:.0f} s)")
    start = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        output += f"\n(stopped at the part's budget, {timeout:.0f} s)"
        code = "timeout"
    (out / "pytest_gpu.log").write_text(output)
    summary = next(
        (
            line
            for line in reversed(output.splitlines())
            if " in " in line
            and ("passed" in line or "skipped" in line or "failed" in line or "error" in line)
        ),
        output.splitlines()[-1] if output else "",
    )
    log(f"pytest: {summary.strip()} (exit {code})")
    return {"exit": code, "summary": summary.strip(), "seconds": time.perf_counter() - start}


def _cli(args: list[str]) -> tuple[int, str]:
    """``src.cli.main(args)`` in this process; (exit status, the error's last lines)."""
    from src.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        main(args)
        return 0, ""
    except SystemExit as err:  # the CLI's own errors: a message on stderr and an exit status
        return int(err.code or 0), f"exit {err.code}"
    except Exception as err:
        return 1, "".join(traceback.format_exception_only(type(err), err)).strip()[-600:]
    finally:
        sys.argv = argv


def part_cli(
    flags: dict[str, list[str]], device: str, epochs: int, work: Path, budget: Budget
) -> list[dict[str, Any]]:
    """Each config × precision: fit (a few epochs, test after fit), then predict from its checkpoint."""
    import torch

    from benchmarks.runner import PAIRS, figures, run_folder

    rows = []
    accelerator = "gpu" if device == "cuda" else "cpu"
    for name, pair in PAIRS.items():
        for precision in PRECISIONS:
            row: dict[str, Any] = {"pair": name, "precision": precision}
            rows.append(row)
            if budget.left() <= 0:
                row["status"] = "skipped (budget)"
                continue
            save = work / "cli" / f"{name}_{precision}"
            common = [
                f"--trainer.accelerator={accelerator}",
                "--trainer.devices=1",
                f"--trainer.precision={precision}",
            ]
            log(f"cli: {name} {precision}: fit {epochs} epoch(s) + test, then predict")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            code, err = _cli([
                "fit", "--config", str(ROOT / pair.config), *flags[name], *common,
                f"--trainer.max_epochs={epochs}", "--test_after_fit=true",
                f"--trainer.logger.init_args.save_dir={save}", "--trainer.enable_progress_bar=false",
            ])  # fmt: skip
            row["fit_test_s"] = round(time.perf_counter() - start, 2)
            if code != 0:
                row.update(status="fit failed", error=err)
                log(f"cli: {name} {precision}: fit FAILED {err}")
                continue
            run = run_folder(save)
            fig = figures(run)
            row.update(
                test_acc=fig["test_acc"],
                test_f1=fig["test_f1"],
                best_val_acc=fig["best_val_acc"],
                epochs=fig["epochs"],
            )
            ckpt = next(
                (run / "checkpoints" / c for c in fig["checkpoints"] if c != "last.ckpt"),
                run / "checkpoints" / "last.ckpt",
            )
            start = time.perf_counter()
            code, err = _cli(
                ["predict", "--ckpt_path", str(ckpt), *common, "--trainer.enable_progress_bar=false"]
            )
            row["predict_s"] = round(time.perf_counter() - start, 2)
            predictions = sorted(p for p in ckpt.parents[2].rglob("predictions.csv"))
            row["predicted_rows"] = sum(1 for _ in predictions[-1].open()) - 1 if predictions else 0
            if device == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            row["status"] = "ok" if code == 0 and row["predicted_rows"] > 0 else f"predict failed {err}"
            log(
                f"cli: {name} {precision}: test acc {fig['test_acc']:.4f}, {row['predicted_rows']} predictions, {row['status']}"
            )
    return rows


def part_speed(
    flags: dict[str, list[str]], device: str, dry_run: bool, work: Path, budget: Budget
) -> dict[str, Any]:
    """Per pair: (a)/(a0)/(b) per epoch at the default and a large batch; time to the targets."""
    from benchmarks import speed
    from benchmarks.runner import PAIRS

    results: dict[str, Any] = {}
    save = str(work / "speed")
    for name in SPEED_ORDER:
        pair = PAIRS[name]
        res: dict[str, Any] = {"per_epoch": [], "skipped": []}
        results[name] = res
        extra = list(flags[name])
        sizes = [None, 64 if dry_run else LARGE_BATCH[name]]
        epochs = 2 if dry_run else 4
        for bs in sizes:
            if budget.left() <= 0:
                res["skipped"].append(f"per-epoch batch {bs or 'default'} (budget)")
                continue
            log(f"speed: {name} batch {bs or 'default'}: (a), (a0), (b) x {epochs} epochs")
            try:
                r = speed.per_epoch(
                    pair,
                    device=device,
                    batch_size=bs,
                    epochs=epochs,
                    repeats=1,
                    save_dir=save,
                    extra=extra,
                    echo=False,
                )
                res["per_epoch"].append(r)
                log(
                    f"speed: {name} batch {r['batch_size']}: a {r['a_s']:.4f} s/epoch, a/a0 {r['a_over_a0']:.3f}, a/b {r['a_over_b']:.3f}, "
                    f"(a) {r['a_samples_per_s']:,.0f} samples/s, peak {r.get('a_peak_mib')}"
                )
            except Exception as err:
                res["per_epoch_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()[
                    -600:
                ]
                log(f"speed: {name} FAILED {res['per_epoch_error']}")
        if budget.left() <= 0:
            res["skipped"].append("time to target (budget)")
            continue
        log(f"speed: {name}: full runs of (a) and (b), test accuracy after every epoch")
        try:
            full_extra = [*extra, "--trainer.max_epochs=2"] if dry_run else extra
            res["to_target"] = speed.to_target(
                pair, device=device, save_dir=save, sides=("a", "b"), extra=full_extra
            )
            for side in ("a", "b"):
                f = res["to_target"][side]
                log(
                    f"speed: {name} ({side}): {f['epochs']} epochs in {f['training_s']:.1f} s, to targets {f['time_to_target_s']}, final {f['final_acc']}"
                )
        except Exception as err:
            res["to_target_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()[-600:]
            log(f"speed: {name} time to target FAILED {res['to_target_error']}")
        if res["per_epoch"]:
            res["verdicts"] = speed.verdicts(name, res["per_epoch"][0], res.get("to_target"))
    return results


# ---------------------------------------------------------------------------------------- report
CLI_COLUMNS = (
    ("epochs", ""),
    ("test_acc", ".4f"),
    ("test_f1", ".4f"),
    ("fit_test_s", ""),
    ("predict_s", ""),
    ("predicted_rows", ""),
    ("peak_mib", ""),
)


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, spec)


def write_report(out: Path, report: dict[str, Any]) -> None:
    from benchmarks import speed

    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    rows = [(n, r) for n, res in report.get("speed", {}).items() for r in res.get("per_epoch", [])]
    if rows:
        keys = list(rows[0][1])
        with (out / "speed.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["pair", *keys], extrasaction="ignore")
            writer.writeheader()
            for name, r in rows:
                writer.writerow({"pair": name, **r})
    cli_rows = report.get("cli", [])
    if cli_rows:
        keys = sorted(
            {k for r in cli_rows for k in r}, key=lambda k: (k not in ("pair", "precision", "status"), k)
        )
        with (out / "cli_runs.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(cli_rows)
    env = report["environment"]
    lines = [
        f"# Device check ({'dry run, CPU, tiny data' if report['dry_run'] else env.get('gpu', 'no GPU')})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; torch {env['torch']}, lightning {env.get('lightning')}, python {env['python']}; "
        f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        f"## 1. pytest -m gpu\n\n{report.get('pytest', {}).get('summary', 'not run')}",
        "",
        "## 2. Every config through the CLI (fit + test after fit, then predict from the checkpoint)",
        "",
        "| pair | precision | status | epochs | test acc | test F1 | fit+test s | predict s | predictions | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cli_rows:
        cells = [_cell(r, k, spec) for k, spec in CLI_COLUMNS]
        lines.append(f"| {r['pair']} | {r['precision']} | {r.get('status')} | " + " | ".join(cells) + " |")
    lines += ["", "## 3. Speed: (a) project, (a0) bare Trainer, (b) hand loop", ""]
    if rows:
        lines += speed.table(rows)
    fulls = [(n, res["to_target"]) for n, res in report.get("speed", {}).items() if "to_target" in res]
    if fulls:
        lines += [
            "",
            "Time to target test accuracy (training time from the first epoch; evaluation not counted)",
            "",
        ]
        lines += speed.target_table(fulls)
    lines += ["", "## Verdicts", ""]
    for name, res in report.get("speed", {}).items():
        for v in res.get("verdicts", []):
            lines.append(f"- {name}: {v}")
        for what in res.get("skipped", []):
            lines.append(f"- {name}: skipped {what}")
        for key in ("per_epoch_error", "to_target_error"):
            if key in res:
                lines.append(f"- {name}: {key.replace('_', ' ')}: `{res[key]}`")
    lines += ["", "## Environment", "", "```", json.dumps(env, indent=1), "```", ""]
    (out / "device_check.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for the report files")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny data, short runs (CI)")
    parser.add_argument("--budget-s", type=float, default=None, help="whole check (default 480; dry run 150)")
    parser.add_argument("--data-dir", type=Path, default=None, help="parquet copies and the MNIST-1D cache")
    parser.add_argument("--parts", nargs="+", default=list(SHARES), choices=list(SHARES))
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.output.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA GPU here: run with --dry-run (CPU, tiny data), or on the GPU machine (docs/gpu.md)")
        return 2
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("BN_NUM_THREADS", 1)))
    budget = Budget(args.budget_s or (150.0 if args.dry_run else 480.0))
    data_dir = args.data_dir or (ROOT / ".devdata" if (ROOT / ".devdata").is_dir() else None)
    if data_dir is None:
        from benchmarks.runner import default_data_dir

        data_dir = default_data_dir()
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "budget_s": budget.total,
        "data_dir": str(data_dir),
        "work": str(work),
    }
    report["environment"] = env = environment(device)
    log(f"environment: {json.dumps(env)}")
    flags = pair_flags(args.dry_run, Path(data_dir).resolve(), work)
    order = [p for p in SHARES if p in args.parts]
    for i, part in enumerate(order):
        budget.begin(SHARES[part] / sum(SHARES[p] for p in order[i:]))
        log(f"part {part}: {budget.left():.0f} s")
        try:
            if part == "pytest":
                report["pytest"] = part_pytest(args.output, budget)
            elif part == "cli":
                report["cli"] = part_cli(flags, device, 1 if args.dry_run else 3, work, budget)
            else:
                report["speed"] = part_speed(flags, device, args.dry_run, work, budget)
        except Exception as err:
            report[f"{part}_error"] = traceback.format_exc()[-2000:]
            log(f"part {part} FAILED: {err}")
        report["seconds"] = budget.elapsed()
        write_report(args.output, report)  # after every part: a later failure keeps what was measured
    log(f"done in {budget.elapsed():.0f} s: {', '.join(sorted(p.name for p in args.output.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
