"""What batch norm does to activations: their mean and variance per layer, at initialisation and
while training, logged to TensorBoard.

Tracked layers are found by type, so the callback works with any model:

- residual blocks: any module with a class attribute ``residual = True`` (its output is the
  residual stream after the block, where the variance grows without batch norm);
- the shared norm/activation blocks (:class:`~src.models.layers.NormAct`);
- normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) outside a ``NormAct``.

The variance of a layer's output is the variance of each feature (channel) over the batch (and
over positions for ``(N, C, L)`` outputs), averaged over features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from src.callbacks.observing import first_batch, modes_kept, own_random_stream
from src.models.layers import NormAct

NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm)
# Histograms of very wide layers are subsampled to this many values (TensorBoard bins them anyway).
MAX_HISTOGRAM_VALUES = 100_000


def tracked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Residual blocks, ``NormAct`` blocks and norm layers outside them, in definition order."""
    out: dict[str, nn.Module] = {}
    inside_norm_act: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, NormAct):
            inside_norm_act.update(id(m) for m in module.modules() if m is not module)
        is_block = getattr(type(module), "residual", False) is True or isinstance(module, NormAct)
        if is_block or (isinstance(module, NORM_TYPES) and id(module) not in inside_norm_act):
            out[name] = module
    return out


def output_stats(x: Tensor) -> Tensor:
    """``[mean, variance]`` of a layer output: per-feature variance over the batch (and positions)."""
    x = x.detach().float()
    features = x.transpose(0, 1).flatten(1) if x.dim() > 2 else x.t()  # (features, samples)
    return torch.stack([x.mean(), features.var(dim=1, unbiased=False).mean()])


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Forward in train mode (batch statistics) without updating BatchNorm running statistics."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class _Recorder:
    """Forward hooks on the tracked layers that record stats only while ``active``.

    The hooks are attached only for the forward passes that record (:meth:`attach`,
    :meth:`remove`): a module with a forward hook takes PyTorch's slower call path on every call.
    """

    def __init__(self, model: nn.Module, attach: bool = True) -> None:
        self.modules = tracked_modules(model)
        self.active = False
        self.keep_values = False
        self.stats: dict[str, Tensor] = {}
        self.values: dict[str, Tensor] = {}
        self.handles: list[Any] = []
        if attach:
            self.attach()

    def attach(self) -> None:
        if not self.handles:
            self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Cheap when inactive: no tensor work, so training steps between logs never sync.
            if not self.active or not isinstance(output, Tensor) or output.dim() < 2:
                return
            self.stats[name] = output_stats(output)
            if self.keep_values:
                flat = output.detach().flatten()
                step = max(1, flat.numel() // MAX_HISTOGRAM_VALUES)
                self.values[name] = flat[::step]

        return hook

    def take(self) -> tuple[dict[str, tuple[float, float]], dict[str, Tensor]]:
        """Return the recorded stats as floats (one host sync for all layers) and the values."""
        names = list(self.stats)
        floats = torch.stack([self.stats[n] for n in names]).cpu().tolist() if names else []
        stats = {n: (m, v) for n, (m, v) in zip(names, floats, strict=True)}
        values = {n: v.float().cpu() for n, v in self.values.items()}
        self.stats, self.values, self.active, self.keep_values = {}, {}, False, False
        return stats, values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def collect_activation_stats(model: nn.Module, x: Tensor) -> dict[str, tuple[float, float]]:
    """Mean and variance of every tracked layer's output for one batch ``x`` (at least two samples),
    in train mode (batch statistics, as a training step sees them) on the model's own random
    stream, without changing its running statistics, its modules' modes or the global random
    state."""
    recorder = _Recorder(model)
    try:
        with modes_kept(model), frozen_norm_statistics(model), own_random_stream(x.device):
            model.train()
            recorder.active = True
            model(x)
        return recorder.take()[0]
    finally:
        recorder.remove()


class ActivationStats(Callback):
    """Log the activation mean and variance of every normalised/residual layer to TensorBoard.

    At the start of a new ``fit`` the first training batch, as the first step sees it but without
    training-time augmentation, goes through the model in train mode: BatchNorm normalises with
    the batch's statistics, as in training, while its running statistics stay as they are, and
    dropout draws from a stream of its own (:func:`collect_activation_stats`). Its statistics are
    logged under ``activations_init/{mean,var}/<layer>`` with a plot of variance against depth
    (``activations_init/variance_per_layer``). A run that starts from a checkpoint has no
    initial statistics to log (its weights are not initial). During
    training, every ``every_n_steps`` optimizer steps the training batch's statistics go to
    ``activations/{mean,var}/<layer>`` and every ``histogram_every_n_steps`` steps a histogram of
    each layer's output to ``activations/hist/<layer>``. Between logging steps no hook is attached.

    Args:
        every_n_steps: log mean/variance every this many optimizer steps (0 = only at init).
        histogram_every_n_steps: log histograms every this many steps (0 = never; TensorBoard only).
        at_init: log the statistics of the first training batch at the start of a new ``fit``.
    """

    def __init__(
        self, every_n_steps: int = 50, histogram_every_n_steps: int = 500, at_init: bool = True
    ) -> None:
        if every_n_steps < 0 or histogram_every_n_steps < 0:
            raise ValueError("every_n_steps and histogram_every_n_steps must be >= 0 (0 switches them off)")
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.at_init = at_init
        self._recorder: _Recorder | None = None
        self._step = 0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not tracked_modules(pl_module):
            rank_zero_warn(
                f"ActivationStats found no residual blocks, NormAct blocks or norm layers in "
                f"{type(pl_module).__name__}; nothing will be logged."
            )
        # Every rank runs the pass (SyncBatchNorm communicates in train mode); rank 0 logs it.
        if self.at_init and trainer.ckpt_path is None:
            batch = self._initial_batch(trainer)
            if batch is not None:
                self._log_init(trainer, pl_module, batch)
        self._recorder = _Recorder(pl_module, attach=False)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is None or not trainer.is_global_zero:
            return
        step = self._step = trainer.global_step
        self._recorder.active = _due(step, self.every_n_steps)
        self._recorder.keep_values = (
            _due(step, self.histogram_every_n_steps) and _tensorboard(trainer) is not None
        )
        self._recorder.active |= self._recorder.keep_values
        if self._recorder.active:
            self._recorder.attach()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is None or not self._recorder.active:
            return
        stats, values = self._recorder.take()
        self._recorder.remove()
        step = self._step  # the step at which this batch started
        self._log_scalars(trainer, "activations", stats, step)
        tb = _tensorboard(trainer)
        for name, v in values.items():
            if tb is not None:
                tb.experiment.add_histogram(f"activations/hist/{name}", v, step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    # ------------------------------------------------------------------ helpers
    def _initial_batch(self, trainer: Trainer) -> Tensor | None:
        datamodule = trainer.datamodule
        if datamodule is None:
            rank_zero_warn("ActivationStats: no DataModule, so no statistics at initialisation.")
            return None
        try:
            batch = first_batch(trainer, datamodule.train_dataloader())
        except (StopIteration, NotImplementedError, MisconfigurationException, TypeError):
            rank_zero_warn("ActivationStats: no training batch, so no statistics at initialisation.")
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or len(x) < 2:
            rank_zero_warn(
                "ActivationStats: the first training batch has fewer than two samples (batch "
                "statistics need two), so no statistics at initialisation."
            )
            return None
        return x

    def _log_init(self, trainer: Trainer, pl_module: LightningModule, x: Tensor) -> None:
        stats = collect_activation_stats(pl_module, x)
        if not trainer.is_global_zero:
            return
        self._log_scalars(trainer, "activations_init", stats, trainer.global_step)
        tb = _tensorboard(trainer)
        if tb is not None and stats:
            tb.experiment.add_figure(
                "activations_init/variance_per_layer", variance_figure(stats), trainer.global_step
            )

    @staticmethod
    def _log_scalars(trainer: Trainer, prefix: str, stats: dict[str, tuple[float, float]], step: int) -> None:
        metrics = {}
        for name, (mean, var) in stats.items():
            metrics[f"{prefix}/mean/{name}"] = mean
            metrics[f"{prefix}/var/{name}"] = var
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def variance_figure(
    stats: dict[str, tuple[float, float]], title: str = "Activation variance per layer"
) -> Any:
    """A matplotlib figure of output variance against layer (in definition order)."""
    from matplotlib.figure import Figure

    names = list(stats)
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 2), 3.2))
    ax = fig.subplots()
    ax.plot(range(len(names)), [stats[n][1] for n in names], marker="o")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("variance")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
