"""Scaling behaviour that needs no second process: no host syncs per step, batch-norm handling
under DDP, the effective batch-size report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from src.callbacks.scaling import ScalingSetup, effective_batch_report
from src.data import TensorBatches
from src.models import ResidualBN
from src.models.metrics import TrainStats

# Python-level conversions of a tensor: on a GPU each one waits for the device (a host sync).
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


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
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Spied(num_classes=10, lr_scheduler=None), TensorBatches((x, y), 16, shuffle=True))
    assert trainer.global_step == 4
    assert calls == [], f"training_step forced host syncs: {sorted(set(calls))}"


def test_train_stats_match_torchmetrics_and_weight_the_loss_by_samples():
    torch.manual_seed(0)
    stats = TrainStats(num_classes=5)
    acc = MulticlassAccuracy(5, average="micro")
    f1 = MulticlassF1Score(5, average="macro")
    losses, sizes = [1.0, 4.0], [30, 10]
    for loss, n in zip(losses, sizes, strict=True):
        logits, y = torch.randn(n, 5), torch.randint(0, 4, (n,))  # class 4 absent from targets
        logits[:, 4] = -10  # ... and never predicted
        stats.update(logits, y, torch.tensor(loss))
        acc.update(logits, y)
        f1.update(logits, y)
    out = stats.compute()
    assert float(out["loss"]) == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)  # per sample, not per batch
    assert float(out["acc"]) == pytest.approx(float(acc.compute()))
    assert float(out["f1"]) == pytest.approx(float(f1.compute()))


def fake_trainer(
    device: str, world_size: int = 2, layer_sync=True, batch_size: int = 100, accumulate: int = 1
):
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    return SimpleNamespace(
        world_size=world_size,
        num_nodes=1,
        num_devices=world_size,
        accumulate_grad_batches=accumulate,
        datamodule=SimpleNamespace(batch_size=batch_size),
        optimizers=[optimizer],
        strategy=SimpleNamespace(
            root_device=torch.device(device), _layer_sync=TorchSyncBatchNorm() if layer_sync else None
        ),
    )


def test_sync_batchnorm_kept_on_gpu_and_dropped_with_one_warning_on_cpu():
    model = ResidualBN(num_classes=10)
    gpu = fake_trainer("cuda")
    ScalingSetup().setup(gpu, model, "fit")
    assert isinstance(gpu.strategy._layer_sync, TorchSyncBatchNorm)

    cpu = fake_trainer("cpu")
    with pytest.warns(UserWarning, match="SyncBatchNorm runs only on GPUs") as record:
        ScalingSetup().setup(cpu, model, "fit")
    assert cpu.strategy._layer_sync is None
    assert len([w for w in record if "SyncBatchNorm" in str(w.message)]) == 1


def test_no_batch_norm_warning_for_one_process_or_a_model_without_batch_norm(recwarn):
    ScalingSetup().setup(fake_trainer("cpu", world_size=1), ResidualBN(num_classes=10), "fit")
    ScalingSetup().setup(fake_trainer("cpu"), ResidualBN(num_classes=10, batch_norm=False), "fit")
    assert not [w for w in recwarn if "SyncBatchNorm" in str(w.message)]


def test_effective_batch_report_multiplies_processes_and_accumulation():
    report = effective_batch_report(fake_trainer("cuda", world_size=4, accumulate=2, batch_size=100))
    assert "Effective batch size 800 = 100 per process × 4 process(es)" in report
    assert "AdamW lr 0.01" in report


def test_epoch_metrics_logged_once_per_epoch_and_reset(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.epochs: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    torch.manual_seed(0)
    x, y = torch.randn(96, 40), torch.randint(0, 10, (96,))
    xv, yv = torch.randn(40, 40), torch.randint(0, 10, (40,))
    model = ResidualBN(num_classes=10, lr_scheduler=None)
    record = Record()
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    val = TensorBatches((xv, yv), 16)
    trainer.fit(model, TensorBatches((x, y), 16, shuffle=True), val)
    assert {"train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1"} <= set(
        trainer.callback_metrics
    )
    # val_loss of the last epoch is over the 40 validation samples only (the sanity-check
    # batches and the previous epoch were reset)
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(xv), yv)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert len(record.epochs) == 2 and record.epochs[0]["val_loss"] != record.epochs[1]["val_loss"]
    for metric in (model.train_stats, model.val_metrics["acc"], model.val_loss_mean):
        assert metric._update_count == 0  # reset after the epoch


def test_compile_model_compiles_in_place_and_keeps_checkpoint_keys():
    eager = ResidualBN(num_classes=10)
    compiled = ResidualBN(num_classes=10, compile_model=True)
    compiled.configure_model()  # what the Trainer calls; compilation itself happens at first call
    compiled.configure_model()  # idempotent
    assert compiled.net._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
