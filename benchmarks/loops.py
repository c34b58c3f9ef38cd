"""The hand-written PyTorch training loop the project is measured against, and the clock all loops share.

One function, :func:`hand_loop`, trains ``model.net`` as the CLI built it from a config (the same
network, tensors, batch size, optimiser, schedule, augmentation, weight averaging and feature mixup
as the config, with a validation pass after every epoch): that is loop (b) of
``benchmarks/speed.py``. With :data:`SEED_STYLE` options the same function is loop (c), the way
the original notebooks trained: a ``DataLoader`` over a per-sample ``Dataset``, batch 32, a plain
optimiser, no schedule, augmentation, averaging or mixup, and ``loss.item()`` after every step.

:class:`Clock` times epochs (wall and CPU), keeps the evaluations it is asked to run out of the
figures, and records when a target test accuracy was first reached; :class:`EpochClock` is the same
clock as a Lightning callback, for the runs through the Trainer ((a) and (a0)).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils.data import DataLoader, Dataset

from src.models.bn_cnn import mixup_step
from src.models.schedules import spans_the_run


# ---------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on CPU), so host clocks measure it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Epoch boundaries in wall and process CPU time, with evaluations taken out.

    ``epoch_start()`` marks the start of each epoch, ``train_end()`` the end of its training
    batches (before validation) and ``finish()`` the end of the last epoch: an epoch is the span
    from its start to the next one's, so whatever runs in between (validation, checkpoints, logging)
    is counted. ``evaluate`` (test accuracy after each epoch) runs outside the timed spans.
    """

    def __init__(self, target: float | None = None, device: Any = None) -> None:
        self.target = target
        self.device = device
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self._excluded = 0.0
        self._cpu_excluded = 0.0
        self.first_step: float | None = None  # since the clock was made (start-up of a CLI run)
        self.starts: list[tuple[float, float]] = []  # (wall, cpu) of each epoch's start
        self.train_ends: list[tuple[float, float]] = []
        self.end: tuple[float, float] | None = None
        self.accs: list[float] = []
        self.time_to_target: float | None = None  # training time (from the first epoch's start)

    def _now(self) -> tuple[float, float]:
        synchronize(self.device)
        return (
            time.perf_counter() - self.start - self._excluded,
            time.process_time() - self.cpu_start - self._cpu_excluded,
        )

    def step_started(self) -> None:
        if self.first_step is None:
            self.first_step = self._now()[0]

    def epoch_start(self, evaluate: Callable[[], float] | None = None) -> None:
        now = self._now()
        if self.starts:
            self._epoch_done(now, evaluate)
        self.starts.append(self._now())

    def train_end(self) -> None:
        if len(self.train_ends) < len(self.starts):
            self.train_ends.append(self._now())

    def finish(self, evaluate: Callable[[], float] | None = None) -> None:
        if self.end is None and self.starts:
            now = self._now()
            self._epoch_done(now, evaluate)
            self.end = now

    def _epoch_done(self, now: tuple[float, float], evaluate: Callable[[], float] | None) -> None:
        if len(self.train_ends) < len(self.starts):
            self.train_ends.append(now)
        if evaluate is None:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        acc = float(evaluate())
        synchronize(self.device)
        self._excluded += time.perf_counter() - t0
        self._cpu_excluded += time.process_time() - c0
        self.accs.append(acc)
        if self.target is not None and self.time_to_target is None and acc >= self.target:
            self.time_to_target = now[0] - self.starts[0][0]

    # -------------------------------------------------------------------- figures
    @property
    def epochs(self) -> int:
        return len(self.starts)

    def epoch_times(self, cpu: bool = False) -> list[float]:
        """Each finished epoch's span: training, validation and whatever ran until the next epoch."""
        i = 1 if cpu else 0
        marks = [s[i] for s in self.starts] + ([self.end[i]] if self.end else [])
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def train_times(self, cpu: bool = False) -> list[float]:
        """Each epoch's training batches alone (no validation)."""
        i = 1 if cpu else 0
        return [e[i] - s[i] for s, e in zip(self.starts, self.train_ends, strict=False)]

    @property
    def training_time(self) -> float:
        """From the first epoch's start to the end of the last (evaluations excluded)."""
        return (self.end[0] if self.end else self.starts[-1][0]) - self.starts[0][0] if self.starts else 0.0


class EpochClock(Callback):
    """:class:`Clock` as a callback: epoch starts, first training step, end of training, and test
    accuracy (of the weights being trained) after every epoch, outside the timed spans.

    Added to a CLI run with ``--trainer.callbacks+={"class_path": "benchmarks.loops.EpochClock", ...}``;
    the run's clock is then ``EpochClock.last.clock``.

    Args:
        target: test accuracy whose first reaching is timed.
        evaluate: measure test accuracy after each epoch (off: time only).
    """

    last: EpochClock | None = None  # the clock of the latest run in this process

    def __init__(self, target: float | None = None, evaluate: bool = False) -> None:
        self.clock = Clock(target)
        self.evaluate = evaluate
        EpochClock.last = self

    def _evaluator(self, trainer: Any, pl_module: Any) -> Callable[[], float] | None:
        if not self.evaluate:
            return None
        dm = trainer.datamodule
        return lambda: test_accuracy(pl_module.net, dm, dm.splits["test"])

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.clock.device = pl_module.device

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.clock.first_step is None:
            self.clock.step_started()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.clock.epoch_start(self._evaluator(trainer, pl_module))

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.clock.train_end()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.clock.finish(self._evaluator(trainer, pl_module))


@torch.no_grad()
def test_accuracy(net: nn.Module, dm: Any, split: tuple[Tensor, ...], batch_size: int = 4096) -> float:
    """Accuracy of ``net`` on ``split`` (the data's eval transform; eval mode, restored after)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split[0]), batch_size):
        batch = tuple(t[start : start + batch_size].to(device) for t in split)
        x, y = dm.transform_batch(dm.collate(batch), False)[:2]
        correct += (net(x).argmax(-1) == y).sum()
    net.train(was_training)
    return int(correct) / len(split[0])


# ---------------------------------------------------------------------------------------- the loop
@dataclass
class LoopOptions:
    """What the hand loop does; the defaults are loop (b), :data:`SEED_STYLE` loop (c).

    Args:
        epochs: epochs to train.
        batch_size: training batch size (``None``: the data's, as configured).
        schedule_epochs: length of a schedule fitted to the run (one-cycle) when the run stops
            earlier, as early stopping or a time budget does (``None``: ``epochs``).
        recipe: the config's training recipe: its optimiser and learning rate, schedule, label
            smoothing, augmentation (``transform_batch`` in training mode), weight averaging (EMA)
            and feature mixup. Off: ``optimizer`` with a constant rate and plain cross-entropy.
        optimizer: the optimiser without the recipe, ``callable(params)``.
        per_sample: batches from a ``DataLoader`` over a per-sample ``Dataset`` (shuffled), copied
            to the device each step, instead of slices of the on-device tensors.
        item_every_step: read the loss on the host after every step (``loss.item()``).
        validate: a validation pass after every epoch (loss and accuracy, on the device).
        precision: ``32-true`` or ``bf16-mixed`` (autocast).
        device: where the network and tensors live.
        seed: seeds torch before the loop and the per-epoch permutations.
    """

    epochs: int
    batch_size: int | None = None
    schedule_epochs: int | None = None
    recipe: bool = True
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    per_sample: bool = False
    item_every_step: bool = False
    validate: bool = True
    precision: str = "32-true"
    device: str = "cpu"
    seed: int = 0


def seed_style(epochs: int, optimizer: Callable[[Any], torch.optim.Optimizer], **kwargs: Any) -> LoopOptions:
    """Options of loop (c): the original notebooks' way of training."""
    return LoopOptions(
        epochs=epochs,
        batch_size=32,
        recipe=False,
        optimizer=optimizer,
        per_sample=True,
        item_every_step=True,
        validate=False,
        **kwargs,
    )


class PerSample(Dataset):
    """A map-style dataset returning one sample at a time, as the notebooks built them."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tuple(t.cpu() for t in tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


def ema_settings(config: Any) -> dict[str, Any] | None:
    """The weight-averaging callback of a parsed config (``EMAWeights`` or Lightning's
    ``EMAWeightAveraging``) as ``{decay, update_every_n_steps, use_buffers}``, or ``None``. Read
    from the config's ``init_args`` (with the class's defaults), never from a callback object."""
    import inspect

    from lightning.pytorch.callbacks import EMAWeightAveraging

    for cb in _get(_get(config, "trainer") or {}, "callbacks") or []:
        name = str(_get(cb, "class_path") or "").rsplit(".", 1)[-1]
        if name not in ("EMAWeights", "EMAWeightAveraging"):
            continue
        defaults = {
            k: p.default for k, p in inspect.signature(EMAWeightAveraging.__init__).parameters.items()
        }
        args = {**defaults, **dict(_get(cb, "init_args") or {})}
        return {
            "decay": float(args["decay"]),
            "update_every_n_steps": int(args["update_every_n_steps"]),
            "use_buffers": bool(args["use_buffers"]),
        }
    return None


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` of a dict or a jsonargparse ``Namespace`` (``None`` when absent)."""
    if obj is None:
        return None
    return obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def hand_loop(
    model: Any,
    dm: Any,
    options: LoopOptions,
    config: Any = None,
    clock: Clock | None = None,
    evaluate: bool = False,
) -> Clock:
    """Train ``model.net`` on ``dm.splits`` with plain PyTorch; return the epochs' :class:`Clock`.

    ``model`` and ``dm`` are the CLI's (built from a config, e.g. with
    :func:`benchmarks.runner.build`), ``config`` its parsed configuration (for the EMA settings).
    ``evaluate``: test accuracy after every epoch (raw weights), outside the timed spans.
    """
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    if not dm.splits:
        dm.setup("fit")
    splits = {k: tuple(t.to(device) for t in v) for k, v in dm.splits.items()}
    train, val, test = splits["train"], splits.get("val"), splits["test"]
    net = model.net.to(device)
    hp = model.hparams
    recipe = options.recipe
    bs = options.batch_size or dm.batch_size
    n = len(train[0])
    # The config's optimiser at its learning rate, as the module builds it; else the given one.
    optimizer = model.optimizer(net.parameters(), model.lr) if recipe else options.optimizer(net.parameters())
    scheduler, per_step = None, False
    if recipe and model.lr_scheduler is not None:
        kwargs = {}
        if spans_the_run(model.lr_scheduler):
            total = (options.schedule_epochs or options.epochs) * steps_per_epoch(n, bs)
            kwargs, per_step = {"total_steps": total}, True
        scheduler = model.lr_scheduler(optimizer, **kwargs)
    ema = ema_settings(config) if recipe else None
    averaged = None
    if ema is not None:
        averaged = AveragedModel(net, avg_fn=get_ema_avg_fn(ema["decay"]), use_buffers=ema["use_buffers"])
    smoothing = float(hp.get("label_smoothing", 0.0)) if recipe else 0.0
    mixup_alpha = float(hp.get("mixup_alpha", 0.0) or 0.0) if recipe else 0.0
    loader = None
    if options.per_sample:
        g = torch.Generator().manual_seed(options.seed)
        # drop_last only for a one-sample last batch, which BatchNorm cannot train on
        loader = DataLoader(PerSample(train), batch_size=bs, shuffle=True, generator=g, drop_last=n % bs == 1)

    clock = clock or Clock(device=device)
    clock.device = device
    evaluator = (lambda: test_accuracy(net, dm, test)) if evaluate else None
    step = 0
    for epoch in range(options.epochs):
        clock.epoch_start(evaluator)
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        if loader is not None:
            batches = (tuple(t.to(device, non_blocking=True) for t in b) for b in loader)
        else:
            g = torch.Generator().manual_seed(options.seed + epoch)
            perm = torch.randperm(n, generator=g).to(device)
            shuffled = tuple(t[perm] for t in train)
            stop = n - 1 if n % bs == 1 else n
            batches = (tuple(t[i : i + bs] for t in shuffled) for i in range(0, stop, bs))
        for raw in batches:
            clock.step_started()
            x, y = dm.transform_batch(dm.collate(raw), recipe)[:2]
            with _autocast(options.precision, device):
                if mixup_alpha > 0:
                    loss, logits, y = mixup_step(net, x, y, mixup_alpha, smoothing)
                else:
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if per_step:
                scheduler.step()
            if averaged is not None and (step - 1) % max(ema["update_every_n_steps"], 1) == 0:
                averaged.update_parameters(net)
            if options.item_every_step:
                loss.item()
            else:  # training figures kept on the device, read once per epoch
                loss_sum += loss.detach().float() * len(y)
                correct += (logits.detach().argmax(-1) == y).sum()
        clock.train_end()
        val_loss = _validate(averaged.module if averaged is not None else net, dm, val, options, device)
        float(loss_sum), int(correct)  # noqa: B018  (the epoch's one read, as the Trainer logs its metrics)
        if scheduler is not None and not per_step:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(val_loss if val_loss is not None else float("inf"))
            else:
                scheduler.step()
    clock.finish(evaluator)
    return clock


@torch.no_grad()
def _validate(net: nn.Module, dm: Any, val: Any, options: LoopOptions, device: torch.device) -> float | None:
    """The per-epoch validation pass: loss and accuracy on the device, read once."""
    if not options.validate or val is None:
        return None
    net.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    step = dm.eval_batch_size
    for start in range(0, len(val[0]), step):
        x, y = dm.transform_batch(dm.collate(tuple(t[start : start + step] for t in val)), False)[:2]
        with _autocast(options.precision, device):
            logits = net(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    net.train()
    int(correct)  # noqa: B018
    return float(loss) / len(val[0])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of an epoch over ``n`` samples (a one-sample last batch dropped)."""
    return max(1, math.ceil((n - 1 if n % batch_size == 1 else n) / batch_size))


__all__ = [
    "Clock",
    "EpochClock",
    "LoopOptions",
    "PerSample",
    "ema_settings",
    "hand_loop",
    "seed_style",
    "steps_per_epoch",
    "test_accuracy",
]
