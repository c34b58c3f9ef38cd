"""Write and print what ``predict`` returns: the predicted class, its name and the probabilities."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Collect ``predict`` outputs in order and save them as CSV or JSON in the run folder.

    Each row holds the sample index, the predicted class and its name, and the probability of
    every class; for text data (a DataModule with ``texts("predict")``) also the text. Under DDP the per-rank results are gathered and put back in dataset order before
    rank 0 writes them.

    Args:
        output: file to write (``.csv`` or ``.json``); default ``predictions.csv`` in the log dir.
        print_limit: how many predictions to print to the console (0 = none).
        top_k: how many class probabilities to print per prediction, highest first.
        heatmap_dir: for text models (``BNCNN``): a folder to write one token-activation heatmap
            PNG per predicted text (``heatmap_NNNN.png``, NNNN = the prediction's index).
        max_heatmaps: the most heatmap PNGs written.
    """

    def __init__(
        self,
        output: str | None = None,
        print_limit: int = 10,
        top_k: int = 3,
        heatmap_dir: str | None = None,
        max_heatmaps: int = 50,
    ) -> None:
        super().__init__(write_interval="epoch")
        if output is not None and Path(output).suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"PredictionWriter output must end in .csv or .json, got {output!r}")
        self.output = output
        self.print_limit = print_limit
        self.top_k = top_k
        self.heatmap_dir = heatmap_dir
        self.max_heatmaps = max_heatmaps

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        probs = torch.cat([p.float().cpu() for p in _flatten(predictions)]) if predictions else torch.empty(0)
        flat_idx = [i for i in _flatten(batch_indices) if i is not None]
        if flat_idx:
            index = torch.cat([torch.as_tensor(i, dtype=torch.long).flatten() for i in flat_idx])
        else:
            # In-memory TensorBatches shard evaluation data as rank::world_size (no sampler indices).
            index = trainer.global_rank + trainer.world_size * torch.arange(len(probs))
        if trainer.world_size > 1:
            probs, index = _gather_padded(pl_module, probs, index)
        # `trainer.log_dir` is a collective under DDP: every rank must ask for it.
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.csv"
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
        write_rows(rows, path, names)
        for row in rows[: self.print_limit]:
            ranked = sorted(row["probs"].items(), key=lambda kv: -kv[1])[: self.top_k]
            shown = ", ".join(f"{k} {v:.3f}" for k, v in ranked)
            text = f"  {_shorten(row['text'])!r}" if "text" in row else ""
            rank_zero_info(f"[{row['index']}] {row['predicted_name']}  ({shown}){text}")
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}")
        if self.heatmap_dir and texts:
            from src.callbacks.token_heatmap import write_heatmaps

            write_heatmaps(pl_module, trainer.datamodule, texts[: self.max_heatmaps], Path(self.heatmap_dir))


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


def _flatten(items: Any) -> list[Any]:
    """Predictions come as a list per dataloader (of lists per batch) or one flat list."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, list):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


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
