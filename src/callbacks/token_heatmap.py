"""Per-token convolution activations as a heatmap: which words each filter fires on.

Every token has one output per conv filter (SAME padding keeps the conv output aligned with the
tokens), and global max-pooling picks, per filter, the token where it fires most: the columns
that light up are the words the prediction rests on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from matplotlib.figure import Figure

from src.callbacks.observing import modes_kept, own_random_stream

MAX_TOKENS_SHOWN = 60  # wider figures stop being readable


def token_heatmap(
    activations: torch.Tensor,
    tokens: list[str],
    title: str = "",
    row_groups: list[tuple[str, int]] | None = None,
) -> Figure:
    """Draw ``activations`` (filters × tokens) with the tokens on the x axis.

    Args:
        activations: ``(F, T)`` activations of ``F`` filters at ``T`` tokens.
        tokens: the ``T`` token strings.
        title: figure title (e.g. the predicted class and its probability).
        row_groups: optional ``(label, rows)`` per filter group (one per kernel width), marked on
            the y axis.
    """
    act = activations[:, :MAX_TOKENS_SHOWN].float().cpu().numpy()
    tokens = tokens[: act.shape[1]]
    width = min(2 + 0.28 * len(tokens), 20)
    fig = Figure(figsize=(width, 4.5))
    ax = fig.subplots()
    im = ax.imshow(act, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    if row_groups:
        starts, labels, row = [], [], 0
        for label, rows in row_groups:
            starts.append(row + rows / 2 - 0.5)
            labels.append(label)
            row += rows
            if row < act.shape[0]:
                ax.axhline(row - 0.5, color="white", linewidth=0.8)
        ax.set_yticks(starts, labels, fontsize=8)
    ax.set_ylabel("conv filters")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return fig


def text_figure(pl_module: LightningModule, datamodule: Any, text: str) -> tuple[Figure, dict[str, Any]]:
    """Run one raw text through the model (eval mode) and draw its token heatmap."""
    ids, tokens = datamodule.encode_texts([text])
    ids = ids.to(pl_module.device)
    with torch.no_grad(), modes_kept(pl_module), own_random_stream(pl_module.device):
        pl_module.eval()
        activations, _ = pl_module.conv_activations(ids)
        probs = torch.softmax(pl_module(ids).float(), dim=-1)[0].cpu()
    names = list(pl_module.class_names)
    pred = int(probs.argmax())
    shown = tokens[0] or ["<empty>"]
    widths = pl_module.net.kernel_sizes
    groups = [(f"width {k}", activations.shape[1] // len(widths)) for k in widths]
    title = f"predicted {names[pred]} ({probs[pred]:.2f}): " + (text[:90] + "…" if len(text) > 90 else text)
    fig = token_heatmap(activations[0, :, : len(shown)], shown, title, groups)
    return fig, {"predicted_name": names[pred], "probability": float(probs[pred])}


def write_heatmaps(pl_module: LightningModule, datamodule: Any, texts: list[str], folder: Path) -> None:
    """One ``heatmap_NNNN.png`` per text in ``folder`` (used by ``PredictionWriter(heatmaps=N)``)."""
    if not (hasattr(pl_module, "conv_activations") and hasattr(datamodule, "encode_texts")):
        rank_zero_info("heatmaps is set but this model/data has no token activations; no heatmaps written.")
        return
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        fig, _ = text_figure(pl_module, datamodule, text)
        fig.savefig(folder / f"heatmap_{i:04d}.png", dpi=100)
    rank_zero_info(f"Wrote {len(texts)} token heatmaps to {folder}")


class TokenHeatmap(Callback):
    """Logs token × filter heatmaps of the conv activations to TensorBoard at the end of ``test``.

    The first ``num_examples`` test texts are drawn (the IMAGES tab, ``token_heatmap/N``). For
    PNGs of the texts given to ``predict``, set ``heatmaps`` on :class:`PredictionWriter`.

    Args:
        num_examples: test texts drawn at the end of ``test`` (0 = off).
    """

    def __init__(self, num_examples: int = 4) -> None:
        super().__init__()
        self.num_examples = num_examples

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if not self.num_examples or not (hasattr(pl_module, "conv_activations") and hasattr(dm, "texts")):
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        for i, text in enumerate(dm.texts("test")[: self.num_examples]):
            fig, _ = text_figure(pl_module, dm, text)
            for logger in loggers:
                logger.experiment.add_figure(f"token_heatmap/{i}", fig, global_step=trainer.global_step)
