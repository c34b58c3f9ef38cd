"""One torchmetrics object per stage: loss, accuracy, macro-F1 and the per-class report together."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ClassificationStats(Metric):
    """Epoch figures of a classifier from one confusion matrix and a loss sum.

    A step adds two in-place updates on the device (no argument checks, no host sync): the
    per-object bookkeeping of separate torchmetrics objects costs more than a whole training step
    of the small models here. The states are sums, so DDP reduces them exactly. ``compute`` gives
    the values of ``MulticlassAccuracy(average="micro")``, ``MulticlassF1Score(average="macro")``
    (classes neither present nor predicted are left out of the mean, as torchmetrics does) and the
    per-class precision, recall and F1 (``average=None``), pinned by ``tests/test_metrics.py``.

    Args:
        num_classes: number of classes.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state(
            "confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """Add a batch: its logits, integer targets and mean loss."""
        pairs = target * self.num_classes + logits.argmax(dim=-1)
        # index_add_, not bincount: bincount sizes its output from the data, a host sync on GPUs
        self.confusion.view(-1).index_add_(0, pairs, torch.ones_like(pairs))
        self.loss_sum.add_(loss.detach(), alpha=target.shape[0])

    def compute(self) -> dict[str, Tensor]:
        """``loss``, ``acc``, ``f1`` (scalars) and per class ``precision``, ``recall``, ``class_f1``
        and the ``confusion`` matrix (rows: true class, columns: predicted class)."""
        cm = self.confusion.double()
        n = cm.sum().clamp(min=1)
        tp = cm.diagonal()
        predicted, actual = cm.sum(0), cm.sum(1)
        f1_denominator = predicted + actual
        class_f1 = _ratio(2 * tp, f1_denominator)
        present = f1_denominator > 0
        return {
            "loss": (self.loss_sum / n).float(),
            "acc": (tp.sum() / n).float(),
            "f1": (class_f1[present].sum() / present.sum().clamp(min=1)).float(),
            "precision": _ratio(tp, predicted).float(),
            "recall": _ratio(tp, actual).float(),
            "class_f1": class_f1.float(),
            "confusion": self.confusion.clone(),
        }


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))
