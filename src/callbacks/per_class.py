"""Per-class evaluation at the end of ``test``: a confusion-matrix image and a
precision/recall/F1 table in TensorBoard, and the same as JSON in the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from src.runtime.errors import UsageError


class PerClassReport(Callback):
    """Write the per-class report of ``test`` from the model's test figures
    (:class:`~src.models.metrics.ClassificationStats`: precision, recall and F1 per class and the
    confusion matrix, rows = true class, columns = predicted class). The JSON file also holds each
    class's support and the macro and support-weighted averages.

    Args:
        output: JSON file to write; default ``per_class_report.json`` in the run folder. Without a
            run folder (``--trainer.logger=false``, ``fast_dev_run``) and without ``output`` the
            report is only shown in TensorBoard (when logging) and nothing is written.
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self._raw: dict[str, Tensor] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "test" and self.output is not None and Path(self.output).suffix.lower() != ".json":
            raise UsageError(f"the per-class report output {self.output!r} must end in .json.")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before the module logs and resets its test figures (callbacks run first); a collective
        # under DDP, so every rank computes.
        stats = getattr(pl_module, "test_metrics", None)
        self._raw = {k: v.detach().cpu() for k, v in stats.compute().items()} if stats is not None else None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir if trainer.loggers else None  # a collective under DDP
        if not trainer.is_global_zero:
            return
        if self._raw is None:
            rank_zero_warn(
                "PerClassReport: the model has no test figures (use a ClassifierModule subclass); "
                "no per-class report written."
            )
            return
        names = list(getattr(pl_module, "class_names", [str(i) for i in range(len(self._raw["class_f1"]))]))
        report = build_report(self._raw, names)
        path = (
            Path(self.output) if self.output else Path(log_dir) / "per_class_report.json" if log_dir else None
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
            rank_zero_info(f"Wrote the per-class test report to {path}")
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is not None:
            step = trainer.global_step
            tb.experiment.add_text("test/per_class_report", markdown_table(report), step)
            tb.experiment.add_figure("test/confusion_matrix", confusion_figure(report), step)
            tb.experiment.flush()


def build_report(raw: dict[str, Tensor], names: list[str]) -> dict[str, Any]:
    """Turn the per-class tensors into a JSON-ready report with support and averages."""
    confusion = raw["confusion"].long()
    support = confusion.sum(dim=1).tolist()
    total = max(sum(support), 1)
    per_class = {
        name: {
            "precision": float(raw["precision"][i]),
            "recall": float(raw["recall"][i]),
            "f1": float(raw["class_f1"][i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    keys = ("precision", "recall", "f1")
    return {
        "classes": names,
        "per_class": per_class,
        "macro_avg": {k: sum(c[k] for c in per_class.values()) / len(names) for k in keys},
        "weighted_avg": {k: sum(c[k] * c["support"] for c in per_class.values()) / total for k in keys},
        "accuracy": float(confusion.diag().sum()) / total,
        "support": int(sum(support)),
        "confusion_matrix": confusion.tolist(),
    }


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in report["per_class"].items():
        lines.append(
            f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
        )
    for label in ("macro_avg", "weighted_avg"):
        a = report[label]
        lines.append(
            f"| **{label.replace('_', ' ')}** | {a['precision']:.4f} | {a['recall']:.4f} | {a['f1']:.4f} | "
            f"{report['support']} |"
        )
    lines.append(f"\naccuracy: {report['accuracy']:.4f}")
    return "\n".join(lines)


def confusion_figure(report: dict[str, Any]) -> Any:
    """Counts in each cell, coloured by the fraction of the true class (row-normalised)."""
    import numpy as np
    from matplotlib.figure import Figure

    cm = np.asarray(report["confusion_matrix"], dtype=float)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = report["classes"]
    n = len(names)
    fig = Figure(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax = fig.subplots()
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix (accuracy {report['accuracy']:.3f})", fontsize=9)
    fig.tight_layout()
    return fig
