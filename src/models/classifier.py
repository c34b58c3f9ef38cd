"""The shared classification LightningModule: loss, metrics, optimiser and schedule, prediction.

A model subclasses :class:`ClassifierModule` (or :class:`BNClassifier` when its network has batch
norm), declares its own hyperparameters in ``__init__`` with a docstring entry each, and builds its
network from ``self.hparams`` in :meth:`~ClassifierModule.build_network`. Everything a training run
does with the network lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from src.models.layers import BNPosition, NormAct
from src.models.metrics import ClassificationStats
from src.models.schedules import spans_the_run
from src.runtime.value_types import OpenUnitInterval, PositiveFloat, Rate, to_plain

STAGES = ("train", "val", "test")
# What a network reads: float feature vectors/signals/images, or integer token ids. The CLI
# refuses to pair a model with data of the other kind before anything is built.
InputKind = Literal["features", "tokens"]
# An optimiser class with its other arguments; the learning rate is the module's `lr`, so it
# cannot be set twice (the CLI refuses `optimizer.init_args.lr`).
OptimizerFactory = Callable[[Iterable, float], Optimizer]


class ClassifierModule(LightningModule):
    """Base LightningModule of every classifier in the project.

    Each stage (train, val, test) has one :class:`~src.models.metrics.ClassificationStats`,
    updated on the device every step and logged once per epoch as ``{stage}_loss``,
    ``{stage}_acc`` and ``{stage}_f1`` (macro): the training loop never waits for the host.
    ``predict_step`` returns class probabilities.

    Args:
        num_classes: number of classes (linked from the data).
        input_size: size of one input as the network reads it: features, signal length or
            vocabulary size (linked from the data).
        class_names: class names (linked from the data); kept so ``predict`` reports names.
        lr: the learning rate: the optimiser's, and the peak of a one-cycle schedule.
        optimizer: optimiser class and its other arguments, e.g. ``torch.optim.AdamW`` with
            ``weight_decay``.
        lr_scheduler: learning-rate schedule, or ``null``. ``ReduceLROnPlateau`` follows
            ``val_loss`` per epoch; a schedule that takes ``total_steps`` (``OneCycleLR``) gets the
            run's optimiser steps and steps every batch.
        label_smoothing: cross-entropy label smoothing in training.
        compile_model: compile the network with ``torch.compile``.
    """

    input_kind: ClassVar[InputKind] = "features"

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        class_names: list[str] | None = None,
        lr: PositiveFloat = 1e-3,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: Rate = 0.0,
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
        self.save_hyperparameters()
        # Under the CLI the optimiser and schedule are stored in their YAML form (a checkpoint
        # names them); built in Python they are classes or functions, which a weights-only
        # checkpoint cannot hold.
        for key in ("optimizer", "lr_scheduler"):
            if callable(self.hparams.get(key)):
                del self.hparams[key]
        self.hparams.update(to_plain(dict(self.hparams)))
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.lr = float(lr)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net = self.build_network()
        stats = ClassificationStats(num_classes)
        for stage in STAGES:  # `train_metrics`, `val_metrics`, `test_metrics`
            setattr(self, f"{stage}_metrics", stats.clone())
            self.metrics(stage).persistent(True)  # a run resumed mid-epoch keeps its partial figures
        self.example_input_array = self.example_input()
        self._compiled = False
        self._built_for: tuple[float, int | None] | None = None  # see configure_optimizers

    # ------------------------------------------------------------------ network
    def build_network(self) -> nn.Module:
        """The network, built from ``self.hparams``; maps a batch of inputs to class logits."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network()")

    def example_input(self) -> Tensor:
        """A tiny input batch (for the model summary and shape checks)."""
        return torch.zeros(2, self.hparams.input_size)

    def configure_model(self) -> None:
        # Module.compile() compiles in place: parameter names (and so checkpoints) stay those of the
        # eager network, unlike torch.compile(net), which prefixes them with `_orig_mod.`.
        if self.hparams.compile_model and not self._compiled:
            self.net.compile()
            self._compiled = True

    def __deepcopy__(self, memo: dict[int, Any]) -> ClassifierModule:
        from src.runtime.workarounds import deepcopy_without_trainer

        return deepcopy_without_trainer(self, memo, shared=(self.optimizer, self.lr_scheduler))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def metrics(self, stage: str) -> ClassificationStats:
        """The figures of one stage (``train``, ``val`` or ``test``)."""
        return getattr(self, f"{stage}_metrics")

    # ------------------------------------------------------------------ steps
    def loss(self, logits: Tensor, y: Tensor, training: bool) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing if training else 0.0)

    def shared_step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y, training=stage == "train")
        self.metrics(stage).update(logits.detach(), y, loss.detach())
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return torch.softmax(self(batch[0]).float(), dim=-1)

    # ------------------------------------------------------------------ epoch figures
    def log_stage(self, stage: str) -> None:
        """Log the stage's loss, accuracy and macro-F1 once, at the end of its epoch, and reset them.

        A ``self.log`` call per step costs about a millisecond of bookkeeping, more than a whole
        training step of the small models here. The values are reduced across DDP ranks by
        torchmetrics (the same on every rank), so ``sync_dist`` only keeps Lightning from warning.
        """
        stats = self.metrics(stage).compute()
        self.log_dict(
            {f"{stage}_{k}": stats[k] for k in ("loss", "acc", "f1")}, prog_bar=stage == "val", sync_dist=True
        )
        self.metrics(stage).reset()

    def on_train_epoch_start(self) -> None:
        # A fresh epoch must not add to the sums of an epoch that ended in a restored checkpoint.
        # (Not called when a run resumes mid-epoch: the restored partial sums continue.)
        self.metrics("train").reset()

    def on_train_epoch_end(self) -> None:
        self.log_stage("train")

    def on_validation_epoch_end(self) -> None:
        self.log_stage("val")  # also after the sanity check, so its batches are not counted

    def on_test_epoch_end(self) -> None:
        self.log_stage("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters(), self.lr)
        self._built_for = self._optimisation()
        if self.lr_scheduler is None:
            return optimizer
        total_steps = self._built_for[1]
        kwargs = {} if total_steps is None else {"total_steps": total_steps}
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

    def _optimisation(self) -> tuple[float, int | None]:
        """What the optimiser and schedule are built from: the learning rate and, for a schedule laid
        out over the run (``OneCycleLR``), the run's optimiser steps."""
        spans = spans_the_run(self.lr_scheduler)
        return self.lr, int(self.trainer.estimated_stepping_batches) if spans else None

    def on_fit_start(self) -> None:
        # The learning-rate and batch-size finders run at the start of fit, after the optimiser and
        # schedule were built: the learning rate (the schedule's peak) and the run's step count
        # they chose are what trains, so both are built again from them.
        if self._built_for not in (None, self._optimisation()):
            self.trainer.strategy.setup_optimizers(self.trainer)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # Past the end of a fixed-length schedule hold its final learning rate (a resumed run whose
        # devices or batches per epoch changed; the CLI warns about it when the run starts).
        total = getattr(scheduler, "total_steps", None)
        if isinstance(total, int) and scheduler.last_epoch >= total:
            return
        super().lr_scheduler_step(scheduler, metric)


class BNClassifier(ClassifierModule):
    """A classifier whose network has batch norm that can be switched off or moved.

    Args:
        batch_norm: BatchNorm in every block; ``false`` gives the plain network, for comparison.
        bn_position: BatchNorm before the ReLU (``before_activation``) or after it (``after_activation``).
        bn_momentum: BatchNorm running-statistics momentum.
        bn_eps: BatchNorm epsilon.
        **kwargs: the options of :class:`ClassifierModule` (learning rate, optimiser, schedule, ...).
    """

    def __init__(
        self,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        bn_momentum: OpenUnitInterval = 0.1,
        bn_eps: PositiveFloat = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def norm_act(self, width: int) -> NormAct:
        """The BatchNorm/ReLU block of this model's settings, for ``width`` features or channels."""
        hp = self.hparams
        return NormAct(width, hp.batch_norm, hp.bn_position, hp.bn_momentum, hp.bn_eps)
