"""Write and print what ``predict`` returns: the predicted class, its name and the probabilities."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from src.runtime.errors import UsageError
from src.runtime.value_types import NonNegativeInt, PositiveInt


class PredictionWriter(Callback):
    """Print and save what ``predict`` returns: each sample's predicted class, its name, and the
    probability of every class (and, for text data, the text).

    Rows are in dataset order; under DDP every rank's predictions are gathered (rank ``r`` predicts
    samples ``r, r + world, ...``) before rank 0 writes them.

    Args:
        output: file to write (``.csv`` or ``.json``); default ``predictions.csv`` in the run folder.
            Without a run folder (``--trainer.logger=false``, ``fast_dev_run``) and without
            ``output``, predictions are only printed.
        overwrite: replace an existing ``output`` file (otherwise the run stops before predicting).
        print_limit: how many predictions to print to the console (0 = none).
        top_k: how many class probabilities to print per prediction, highest first.
        heatmaps: for text models (``BNCNN``): write a token-activation heatmap PNG for each of the
            first ``heatmaps`` predicted texts into ``heatmaps/`` in the run folder.
    """

    def __init__(
        self,
        output: str | None = None,
        overwrite: bool = False,
        print_limit: NonNegativeInt = 10,
        top_k: PositiveInt = 3,
        heatmaps: NonNegativeInt = 0,
    ) -> None:
        self.output = output
        self.overwrite = overwrite
        self.print_limit = print_limit
        self.top_k = top_k
        self.heatmaps = heatmaps
        self._probs: list[torch.Tensor] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict" or self.output is None:
            return
        path = Path(self.output)
        if path.is_dir():
            raise UsageError(
                f"the predictions output {str(path)!r} is a folder. Pass a .csv or .json file name."
            )
        if path.suffix.lower() not in (".csv", ".json"):
            raise UsageError(f"the predictions output {str(path)!r} must end in .csv or .json.")
        if path.exists() and not self.overwrite:
            raise UsageError(
                f"the predictions output {str(path)!r} already exists. Pass another file, or "
                "--trainer.callbacks.overwrite=true to replace it."
            )

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probs = []

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._probs.append(outputs.detach().float().cpu())

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        probs = torch.cat(self._probs) if self._probs else torch.empty(0)
        self._probs = []
        # The evaluation data is sharded as rank::world_size (no padding), in order.
        index = trainer.global_rank + trainer.world_size * torch.arange(len(probs))
        if trainer.world_size > 1:
            probs, index = _gather_padded(pl_module, probs, index)
        log_dir = trainer.log_dir if trainer.loggers else None  # a collective under DDP
        if not trainer.is_global_zero:
            return
        order = torch.argsort(index)
        probs, index = probs[order], index[order]
        names = list(getattr(pl_module, "class_names", [str(i) for i in range(probs.shape[-1])]))
        rows = prediction_rows(probs, names, index.tolist())
        texts = _predict_texts(trainer)
        if texts is not None and len(texts) == len(rows):
            for row in rows:
                row["text"] = texts[row["index"]]
        for row in rows[: self.print_limit]:
            ranked = sorted(row["probs"].items(), key=lambda kv: -kv[1])[: self.top_k]
            shown = ", ".join(f"{k} {v:.3f}" for k, v in ranked)
            text = f"  {_shorten(row['text'])!r}" if "text" in row else ""
            rank_zero_info(f"[{row['index']}] {row['predicted_name']}  ({shown}){text}")
        path = Path(self.output) if self.output else Path(log_dir) / "predictions.csv" if log_dir else None
        if path is None:
            rank_zero_info(
                f"{len(rows)} predictions; none written: this run has no run folder (logger off or "
                "fast_dev_run). Pass --trainer.callbacks.output=<file.csv> to save them."
            )
            return
        write_rows(rows, path, names)
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}")
        if self.heatmaps and texts and log_dir:
            from src.callbacks.token_heatmap import write_heatmaps

            write_heatmaps(pl_module, trainer.datamodule, texts[: self.heatmaps], Path(log_dir) / "heatmaps")


def _predict_texts(trainer: Trainer) -> list[str] | None:
    """The raw texts behind the predictions, when the DataModule keeps them (text datasets)."""
    texts = getattr(trainer.datamodule, "texts", None)
    return list(texts("predict")) if callable(texts) else None


def _shorten(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _gather_padded(pl_module: LightningModule, probs: torch.Tensor, index: torch.Tensor) -> tuple:
    """all_gather needs equal shapes: pad each rank's rows to the longest, then drop the padding."""
    n = torch.tensor([len(index)], device=pl_module.device)
    longest = int(pl_module.all_gather(n).max())
    pad = longest - len(index)
    probs = torch.cat([probs, probs.new_zeros(pad, probs.shape[-1])]) if pad else probs
    index = torch.cat([index, index.new_full((pad,), -1)]) if pad else index
    gathered = pl_module.all_gather({"p": probs.to(pl_module.device), "i": index.to(pl_module.device)})
    probs, index = gathered["p"].flatten(0, 1).cpu(), gathered["i"].flatten(0, 1).cpu()
    keep = index >= 0
    return probs[keep], index[keep]


def prediction_rows(probs: torch.Tensor, names: list[str], index: list[int]) -> list[dict[str, Any]]:
    pred = probs.argmax(dim=-1).tolist()
    return [
        {
            "index": i,
            "predicted": c,
            "predicted_name": names[c],
            "probs": {n: round(float(p), 6) for n, p in zip(names, row.tolist(), strict=True)},
        }
        for i, c, row in zip(index, pred, probs, strict=True)
    ]


def write_rows(rows: list[dict[str, Any]], path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        has_text = bool(rows) and "text" in rows[0]
        text_col = ["text"] if has_text else []
        writer.writerow(["index", "predicted", "predicted_name", *[f"p_{n}" for n in names], *text_col])
        for r in rows:
            text = [r["text"]] if has_text else []
            writer.writerow([r["index"], r["predicted"], r["predicted_name"], *r["probs"].values(), *text])
