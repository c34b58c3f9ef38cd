"""The shared classification LightningModule: loss, metrics, logging, optimiser, prediction.

A concrete model subclasses :class:`ClassifierModule` and only builds ``self.net``; everything a
training run does with it lives here once.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from src.models.metrics import TrainStats

STAGES = ("train", "val", "test")
# Shown in TensorBoard's hparams tab beside the run's hyperparameters.
HP_METRICS = ("hp/best_val_acc", "hp/test_acc", "hp/test_f1")
# Metric objects whose state is part of the checkpoint (see `__init__`); the training one is
# reset when a fresh epoch starts.
TRAIN_METRICS = ("train_stats",)
RESUMABLE_METRICS = (*TRAIN_METRICS, "best_val_acc")


class ClassifierModule(LightningModule):
    """Base LightningModule for every classifier in the project.

    Metrics are torchmetrics objects updated on the device every step and computed once per
    epoch (``{stage}_loss``, ``{stage}_acc``, ``{stage}_f1`` with macro averaging), so the
    training loop never forces a host synchronisation. ``predict_step`` returns class
    probabilities.

    Args:
        num_classes: number of classes (linked from the DataModule).
        class_names: class names (linked from the DataModule); stored in the checkpoint so
            ``predict`` can report names.
        optimizer: optimiser class and its arguments, e.g. ``torch.optim.AdamW`` with ``lr``.
        lr_scheduler: learning-rate scheduler or ``null``. ``ReduceLROnPlateau`` monitors
            ``val_loss`` per epoch; schedulers that take ``total_steps`` (``OneCycleLR``) get the
            run's total optimizer steps and step every batch.
        label_smoothing: cross-entropy label smoothing.
        compile_model: wrap the network with ``torch.compile``.
    """

    net: nn.Module

    def __init__(
        self,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = ReduceLROnPlateau,
        label_smoothing: float = 0.0,
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
        # The callables are not primitives: keep them out of hparams outside the CLI (inside it,
        # LightningCLI stores their YAML form instead).
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.compile_model = compile_model
        # Training: one cheap metric object for loss/acc/F1 (no argument checks, no host sync).
        self.train_stats = TrainStats(num_classes)
        # Evaluation: one attribute per stage (`val_metrics`, `test_loss_mean`, ...). No NaN
        # filtering of the loss: it syncs with the host, and a NaN loss should show in the logs.
        for s in ("val", "test"):
            metrics = MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "f1": MulticlassF1Score(num_classes, average="macro"),
                },
                prefix=f"{s}_",
            )
            setattr(self, f"{s}_metrics", metrics)
            setattr(self, f"{s}_loss_mean", MeanMetric(nan_strategy="disable"))
        self.best_val_acc = MaxMetric()
        # Per-class report of `test` (seed 001): precision/recall/F1 per class and the confusion
        # matrix, kept for callbacks (e.g. a report writer) in `self.test_report`.
        self.test_per_class = MetricCollection(
            {
                "precision": MulticlassPrecision(num_classes, average=None),
                "recall": MulticlassRecall(num_classes, average=None),
                "f1": MulticlassF1Score(num_classes, average=None),
                "confusion": MulticlassConfusionMatrix(num_classes),
            }
        )
        self.test_report: dict[str, Tensor] = {}
        # Saved in checkpoints, so a run resumed mid-epoch reports the same epoch figures and the
        # best validation accuracy so far survives a restart.
        for name in RESUMABLE_METRICS:
            getattr(self, name).persistent(True)

    # ------------------------------------------------------------------ network
    def configure_model(self) -> None:
        # Module.compile() compiles in place: parameter names (and so checkpoints) stay those of
        # the eager network, unlike `torch.compile(net)` which prefixes them with `_orig_mod.`.
        if self.compile_model and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile()

    def __deepcopy__(self, memo: dict[int, Any]) -> ClassifierModule:
        # EMAWeightAveraging deep-copies the module in `setup`. The copy must not drag the Trainer along
        # (under DDP it holds the launcher's worker processes, which cannot be copied), and the
        # optimizer/scheduler factories are shared, not copied.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for shared in (self.optimizer, self.lr_scheduler):
            memo[id(shared)] = shared
        state = {k: v for k, v in self.__dict__.items() if k != "_trainer"}
        new.__setstate__(copy.deepcopy(state, memo))
        new._trainer = None
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``self.net(x)``; a failure names the model, the data and the input (e.g. an MLP fed tokens)."""
        try:
            return self.net(x)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, IndexError) as err:
            dm = self._trainer.datamodule if self._trainer is not None else None
            data = type(dm).__name__ if dm is not None else "the data"
            raise InputMismatchError(
                f"{type(self).__name__} failed on a batch from {data} (inputs of shape {tuple(x.shape)}, dtype "
                f"{x.dtype}): {type(err).__name__}: {(str(err).splitlines() or [''])[0]}. A model can only be "
                "paired with data of the input kind and size it was built for: pick a model and data pair "
                "from configs/."
            ) from err

    # ------------------------------------------------------------------ steps
    def shared_step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        if stage == "train":
            self.train_stats.update(logits.detach(), y, loss)
            return loss
        # One value per sample: a sample-weighted epoch mean (torchmetrics ignores `weight` when
        # NaN checks are disabled).
        getattr(self, f"{stage}_loss_mean").update(loss.detach().expand(y.shape[0]))
        getattr(self, f"{stage}_metrics").update(logits.detach(), y)
        if stage == "test":
            self.test_per_class.update(logits.detach(), y)
        return loss

    def log_epoch_metrics(self, stage: str) -> None:
        """Log the stage's metric objects once, at the end of its epoch.

        Lightning then computes them (reduced across DDP ranks by torchmetrics) and resets them.
        A ``self.log`` call per step would cost about a millisecond of bookkeeping each, more than
        a whole training step of the small models here.
        """
        if stage == "train":
            # computed (and reduced across ranks) by torchmetrics: the same value on every rank
            stats = self.train_stats.compute()
            self.train_stats.reset()
            self.log_dict({f"train_{k}": v for k, v in stats.items()}, sync_dist=True)
            return
        self.log(f"{stage}_loss", getattr(self, f"{stage}_loss_mean"), prog_bar=stage != "train")
        self.log_dict(getattr(self, f"{stage}_metrics"), prog_bar=stage == "val")

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return torch.softmax(self(batch[0]).float(), dim=-1)

    # ------------------------------------------------------------------ hparams tab
    def _log_hparams_with_metrics(self) -> None:
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.log_hyperparams(self.hparams, {k: float("nan") for k in HP_METRICS})

    def on_fit_start(self) -> None:
        self._log_hparams_with_metrics()

    def on_test_start(self) -> None:
        if self.trainer.state.fn == "test":  # a stand-alone `test` run has its own log folder
            self._log_hparams_with_metrics()

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")  # also during the sanity check, so its batches are reset
        if self.trainer.sanity_checking:
            return
        self.best_val_acc.update(self.val_metrics["acc"].compute())
        self.log("hp/best_val_acc", self.best_val_acc.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")
        # Already reduced across ranks by torchmetrics (the same value on every rank); sync_dist=True
        # only keeps Lightning from warning under DDP.
        self.log("hp/test_acc", self.test_metrics["acc"].compute(), sync_dist=True)
        self.log("hp/test_f1", self.test_metrics["f1"].compute(), sync_dist=True)
        self.test_report = {k: v.detach().cpu() for k, v in self.test_per_class.compute().items()}
        self.test_per_class.reset()
        for name in ("precision", "recall", "f1"):
            for cls, value in zip(self.class_names, self.test_report[name].tolist(), strict=True):
                self.log(f"test_{name}/{cls}", value, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        # Not called when a run resumes mid-epoch (the restored partial sums continue); called for
        # a fresh epoch, which must not add to the sums of a finished epoch restored from a checkpoint.
        for name in TRAIN_METRICS:
            getattr(self, name).reset()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the metric states were saved still load.
        state = checkpoint.get("state_dict")
        if state is not None:
            for key, value in self.state_dict().items():
                if key.split(".", 1)[0] in RESUMABLE_METRICS and key not in state:
                    state[key] = value

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        kwargs = {}
        if _accepts_unset(self.lr_scheduler, "total_steps"):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler(optimizer, **kwargs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step" if kwargs else "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            dm = self.trainer.datamodule
            if dm is not None and not getattr(dm, "has_validation", True):
                raise MisconfigurationException(
                    "val_size=0 leaves no validation, but ReduceLROnPlateau follows val_loss. Use a "
                    "schedule that needs no validation (e.g. OneCycleLR) or keep a validation split."
                )
            config["monitor"] = "val_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # A run resumed with a larger max_epochs outlives a fixed-length schedule (OneCycleLR):
        # hold its final learning rate instead of failing.
        if _schedule_finished(scheduler):
            return
        super().lr_scheduler_step(scheduler, metric)


class InputMismatchError(RuntimeError):
    """The model could not process the batches the data produced."""


def _schedule_finished(scheduler: Any) -> bool:
    total = getattr(scheduler, "total_steps", None)
    return isinstance(total, int) and scheduler.last_epoch >= total


def _accepts_unset(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes argument ``name`` and leaves it unset (``None``)."""
    bound = getattr(fn, "keywords", None)  # jsonargparse hands over a functools.partial
    if bound is not None and name in bound:
        return bound[name] is None
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is None
