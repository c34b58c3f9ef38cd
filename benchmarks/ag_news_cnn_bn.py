"""AG News × BN-CNN against a TF-IDF + logistic-regression baseline, on the same rows.

    python -m benchmarks.ag_news_cnn_bn                        # ../shared/data/ag_news, 1 seed
    python -m benchmarks.ag_news_cnn_bn --seeds 3
    python -m benchmarks.ag_news_cnn_bn --stages select -- --model.init_args.batch_norm=false

Trains configs/ag_news_cnn_bn.yaml through the real CLI on the local copy of AG News (the
training rows available there; the full 7,600-row test split for test), in two stages, the way a
model is chosen and then trained for good:

- ``select``: validation carved from the training rows by the DataModule (its last 10%); the
  checkpoint with the best validation accuracy is tested. This is where the config's settings
  (schedule length included) were chosen.
- ``final``: the same config on every training row (``--data.init_args.val_size=0``): no
  validation, the weights at the end of the schedule are tested.

Beside each, scikit-learn's TF-IDF (word 1-2-grams) + logistic regression is fitted on exactly
the same training rows and scored on the same test split. Prints test accuracy, macro-F1 and the
wall/CPU time of each, and whether the final stage meets issue 4's goal (>= 0.87 and at or above
the baseline).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import fit_and_test, mean_std

CONFIG = "configs/ag_news_cnn_bn.yaml"
TRAIN_FILE = "train_first_10429_rows.parquet"


def data_settings(overrides: list[str]) -> dict[str, Any]:
    """The config's ``data.init_args``, with ``--data.init_args.X=Y`` overrides applied."""
    settings = dict(yaml.safe_load(Path(CONFIG).read_text())["data"]["init_args"])
    for arg in overrides:
        if arg.startswith("--data.init_args.") and "=" in arg:
            key, value = arg[len("--data.init_args.") :].split("=", 1)
            settings[key] = yaml.safe_load(value)
    return settings


def tfidf_baseline(settings: dict[str, Any], C: float = 10.0) -> dict[str, float]:
    """TF-IDF (word 1-2-grams, sublinear tf) + logistic regression on the DataModule's training part
    (same rows, same validation carve as the CNN's run)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from src.data.ag_news import AGNews

    dm = AGNews(**settings)
    dm.setup("fit")
    labels = {s: split[1].tolist() for s, split in dm.splits.items()}
    start, cpu = time.perf_counter(), time.process_time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(C=C, max_iter=3000)
    clf.fit(vec.fit_transform(dm.texts("train")), labels["train"])
    pred = clf.predict(vec.transform(dm.texts("test")))
    val_acc = clf.score(vec.transform(dm.texts("val")), labels["val"]) if "val" in labels else float("nan")
    return {
        "test_acc": accuracy_score(labels["test"], pred),
        "test_f1": f1_score(labels["test"], pred, average="macro"),
        "val_acc": val_acc,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "n_train": len(labels["train"]),
        "n_val": len(labels.get("val", [])),
        "n_test": len(labels["test"]),
    }


STAGES = {
    "select": ("train/val carve, best-validation checkpoint", []),
    "final": ("every training row (val_size=0), last epoch", ["--data.init_args.val_size=0"]),
}


def run_stage(stage: str, data: list[str], args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """TF-IDF baseline and ``--seeds`` BN-CNN runs of one stage; prints a line per run."""
    overrides = [*data, *STAGES[stage][1], *args.extra]
    base = tfidf_baseline(data_settings(overrides))
    print(
        f"[{stage}] TF-IDF+LR: test_acc {base['test_acc']:.4f}  test_f1 {base['test_f1']:.4f}  val_acc "
        f"{base['val_acc']:.4f}  wall {base['wall_s']:.1f}s  CPU {base['cpu_s']:.1f}s  (train {base['n_train']}, "
        f"val {base['n_val']}, test {base['n_test']} rows)",
        flush=True,
    )
    runs = []
    for seed in range(args.seeds):
        cpu = time.process_time()
        r = fit_and_test(CONFIG, overrides, seed, save_dir="lightning_logs/bench_ag_news")
        r["cpu_s"] = time.process_time() - cpu  # this process's CPU time: the run is in-process
        runs.append(r)
        print(
            f"[{stage}] BN-CNN seed {seed}: test_acc {r['test_acc']:.4f}  test_f1 {r['test_f1']:.4f}  "
            f"best val_acc {r['best_val_acc']:.4f}  epochs {r['epochs']}  wall {r['wall_s']:.1f}s  CPU {r['cpu_s']:.1f}s",
            flush=True,
        )
    return base, runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="../shared/data/ag_news", help="folder with the AG News parquet files"
    )
    parser.add_argument("--train-file", default=TRAIN_FILE, help="training file name inside --data")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    parser.add_argument("extra", nargs="*", help="extra CLI overrides for every run (after --)")
    args = parser.parse_args()
    if args.seeds < 1 or args.threads < 1:
        parser.error("--seeds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    folder = Path(args.data)
    files = {"train": str(folder / args.train_file), "test": str(folder / "test.parquet")}
    data = [f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}"]
    results = {stage: run_stage(stage, data, args) for stage in args.stages}

    print(f"\nAG News ({files['train']}; test: {files['test']}), {args.threads} torch thread(s)")
    print(
        "| stage | model | training rows | test acc | test macro-F1 | wall time per run (s) | CPU time per run (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for stage, (base, runs) in results.items():
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in runs)
        cpus = ", ".join(f"{r['cpu_s']:.0f}" for r in runs)
        print(
            f"| {stage}: {STAGES[stage][0]} | BN-CNN | {base['n_train']} | {mean_std([r['test_acc'] for r in runs])} | "
            f"{mean_std([r['test_f1'] for r in runs])} | {walls} | {cpus} |"
        )
        print(
            f"| | TF-IDF 1-2-grams + LR (C=10) | {base['n_train']} | {base['test_acc']:.4f} | {base['test_f1']:.4f} | "
            f"{base['wall_s']:.0f} | {base['cpu_s']:.0f} |"
        )
    if "final" in results:
        base, runs = results["final"]
        acc = statistics.mean(r["test_acc"] for r in runs)
        met = acc >= 0.87 and acc >= base["test_acc"]
        print(
            f"Goal (final stage, mean of {len(runs)} seed(s)): test acc >= 0.87 and >= TF-IDF+LR: {acc:.4f} vs "
            f"{base['test_acc']:.4f} -> {'met' if met else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
