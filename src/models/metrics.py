"""One cheap torchmetrics object for the training loop: loss, accuracy and macro-F1 together."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TrainStats(Metric):
    """Epoch loss (sample-weighted), accuracy and macro-F1 from one confusion matrix.

    The training step updates this single metric (two in-place adds, no
    argument checks, no host sync) instead of one object per figure: the per-object bookkeeping
    of torchmetrics costs more than a step of the small models here. States are sums, so DDP
    reduces them exactly; ``compute`` gives the same values as ``MulticlassAccuracy(average=
    "micro")`` and ``MulticlassF1Score(average="macro")`` (classes never seen nor predicted are
    left out of the macro mean, as torchmetrics does).

    Args:
        num_classes: number of classes.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state(
            "confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """Add a batch: its logits, integer targets and mean loss."""
        pairs = logits.argmax(dim=-1).add_(target, alpha=self.num_classes)
        # index_add_, not bincount: bincount sizes its output from the data, a host sync on GPUs
        self.confmat.view(-1).index_add_(0, pairs, torch.ones_like(pairs))
        self.loss_sum.add_(loss.detach(), alpha=target.shape[0])  # summed in float64

    def compute(self) -> dict[str, Tensor]:
        cm = self.confmat.double()
        n = cm.sum()
        tp = cm.diagonal()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        denom = 2 * tp + fp + fn
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
        present = denom > 0
        return {
            "loss": (self.loss_sum / n.clamp(min=1)).float(),
            "acc": (tp.sum() / n.clamp(min=1)).float(),
            "f1": (f1[present].sum() / present.sum().clamp(min=1)).float(),
        }
