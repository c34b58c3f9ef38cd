"""PerClassReport: confusion matrix and per-class scores of a tiny known test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.per_class import PerClassReport
from src.models.classifier import ClassifierModule


class GivenLogits(ClassifierModule):
    """Its input *is* the logits, so the predictions are whatever the test says."""

    def build_network(self) -> nn.Module:
        self.unused = nn.Linear(1, 1)  # Lightning wants a parameter
        return nn.Identity()


Y_TRUE = [0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0, 2]


def test_report_holds_the_known_confusion_matrix_and_scores(tmp_path: Path):
    x = torch.nn.functional.one_hot(torch.tensor(Y_PRED), 3).float()
    loader = DataLoader(TensorDataset(x, torch.tensor(Y_TRUE)), batch_size=3)  # several batches
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = Trainer(logger=logger, callbacks=[PerClassReport()], enable_progress_bar=False)
    trainer.test(GivenLogits(num_classes=3, input_size=3, class_names=["cat", "dog", "eel"]), loader)

    report = json.loads((Path(logger.log_dir) / "per_class_report.json").read_text())
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]  # rows true, columns predicted
    cat, dog, eel = (report["per_class"][n] for n in ("cat", "dog", "eel"))
    assert (cat["precision"], cat["recall"], cat["support"]) == pytest.approx((1 / 2, 1 / 2, 2))
    assert (dog["precision"], dog["recall"], dog["support"]) == pytest.approx((2 / 3, 1.0, 2))
    assert (eel["precision"], eel["recall"], eel["support"]) == pytest.approx((1.0, 2 / 3, 3))
    assert dog["f1"] == pytest.approx(0.8)
    assert report["accuracy"] == pytest.approx(5 / 7)
    assert report["weighted_avg"]["recall"] == pytest.approx(5 / 7)  # weighted recall = accuracy

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "test/confusion_matrix" in events.Tags()["images"]
    assert "test/per_class_report/text_summary" in events.Tags()["tensors"]


def test_output_must_be_json():
    from src.runtime.errors import UsageError

    with pytest.raises(UsageError, match="json"):
        PerClassReport(output="report.csv").setup(None, None, "test")
