"""The per-stage figures: the values torchmetrics gives, logged once per epoch, no host sync per step."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from src.data import TensorBatches
from src.models import ResidualBN
from src.models.metrics import ClassificationStats
from tests.helpers.models import quiet_trainer

# Python-level conversions of a tensor: on a GPU each one waits for the device (a host sync).
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def test_stats_match_torchmetrics_and_weight_the_loss_by_samples():
    torch.manual_seed(0)
    stats = ClassificationStats(num_classes=5)
    reference = {
        "acc": MulticlassAccuracy(5, average="micro"),
        "f1": MulticlassF1Score(5, average="macro"),
        "precision": MulticlassPrecision(5, average=None),
        "recall": MulticlassRecall(5, average=None),
        "class_f1": MulticlassF1Score(5, average=None),
        "confusion": MulticlassConfusionMatrix(5),
    }
    for loss, n in ((1.0, 30), (4.0, 10)):
        logits, y = torch.randn(n, 5), torch.randint(0, 4, (n,))  # class 4 absent from the targets
        logits[:, 4] = -10  # ... and never predicted
        stats.update(logits, y, torch.tensor(loss))
        for metric in reference.values():
            metric.update(logits, y)
    out = stats.compute()
    assert float(out["loss"]) == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)  # per sample, not per batch
    for key, metric in reference.items():
        assert torch.allclose(out[key].float(), metric.compute().float()), key


def test_training_step_never_syncs_with_the_host(monkeypatch):
    calls: list[str] = []
    inside = [False]

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            if inside[0]:
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))

    class Spied(ResidualBN):
        def training_step(self, batch, batch_idx):
            inside[0] = True
            try:
                return super().training_step(batch, batch_idx)
            finally:
                inside[0] = False

    torch.manual_seed(0)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    trainer = quiet_trainer(
        max_epochs=1,
        limit_val_batches=0,
    )
    trainer.fit(Spied(num_classes=10, input_size=40), TensorBatches((x, y), 16, shuffle=True))
    assert trainer.global_step == 4
    assert calls == [], f"training_step forced host syncs: {sorted(set(calls))}"


def test_epoch_figures_logged_once_per_epoch_and_reset():
    class Record(Callback):
        def __init__(self):
            self.epochs: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    torch.manual_seed(0)
    x, y = torch.randn(96, 40), torch.randint(0, 10, (96,))
    xv, yv = torch.randn(40, 40), torch.randint(0, 10, (40,))
    model = ResidualBN(num_classes=10, input_size=40)
    record = Record()
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[record],
    )
    trainer.fit(model, TensorBatches((x, y), 16, shuffle=True), TensorBatches((xv, yv), 16))
    assert {"train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1"} <= set(
        trainer.callback_metrics
    )
    # the last epoch's val_loss covers the 40 validation samples only (the sanity-check batches and
    # the previous epoch were reset)
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(xv), yv)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert len(record.epochs) == 2 and record.epochs[0]["val_loss"] != record.epochs[1]["val_loss"]
    for stage in ("train", "val"):
        assert model.metrics(stage)._update_count == 0
