"""What a command's ``--ckpt_path`` loads, what ``fit`` continues, and when it refuses.

The rules (docs/troubleshooting.md, "Resuming a run"):

- A checkpoint path is checked before Lightning reads it: a file this project can load, ``last``,
  or ``best`` within a fit; ``hpc`` and ``registry`` name sources this project does not use.
- ``last`` is the ``last.ckpt`` of the newest run under the logger's folder whose saved config
  matches the command, outside the settings a resume may change (:func:`resumable_keys`).
- A run's length (``max_epochs``/``max_steps``) is part of its experiment when its learning-rate
  schedule is laid out over it (one that takes ``total_steps``: ``OneCycleLR``); then a resume
  with another length is refused. A run with a schedule of its own length may be extended.
- A finished run (it reached its length, or early stopping ended it) is not continued: the command
  says so and what to do.
- A run's ``last.ckpt`` continues in its own folder, wherever that folder is now and whatever the
  working directory; ModelCheckpoint's record of its best files moves with it.
- A tuner (``LearningRateFinder``, ``BatchSizeFinder``) tunes a new run only: a resumed run keeps
  the values its checkpoint holds.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.models.schedules import spans_the_run
from src.runtime.checkpoints import CONFIG_KEY, read_metadata
from src.runtime.errors import UsageError
from src.runtime.settings import config_differences
from src.runtime.tuners import tuner_settings

# Settings a resumed run may change: how long and where it runs, what it prints, the callbacks and
# loggers. The DataModule adds its own (where data is read from: its `resumable_options`);
# everything else describes the experiment and must match.
RESUMABLE_CHANGES = (
    "ckpt_path",
    "test_after_fit",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.min_epochs",
    "trainer.min_steps",
    "trainer.callbacks",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.num_sanity_val_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    "trainer.plugins",
    "trainer.profiler",
    "trainer.detect_anomaly",
    "trainer.default_root_dir",
    "trainer.limit_test_batches",
    "trainer.limit_predict_batches",
    "model.init_args.compile_model",
)
RUN_LENGTH = ("trainer.max_epochs", "trainer.max_steps")
_LOGGERS_WITH_FOLDERS = ("TensorBoardLogger", "CSVLogger")


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------- which settings may change
def resumable_keys(config: dict[str, Any]) -> tuple[str, ...]:
    """The settings in which a run resumed by ``config`` (a command's resolved settings) may differ
    from the run that wrote the checkpoint."""
    keys = list(RESUMABLE_CHANGES)
    data = config.get("data") or {}
    if data.get("class_path"):
        options = getattr(import_class(data["class_path"]), "resumable_options", ())
        keys += [f"data.init_args.{name}" for name in options]
    if spans_the_run(_schedule(config)):
        keys = [k for k in keys if k not in RUN_LENGTH]
    return (*keys, *tuned_settings(config))


def tuned_settings(config: dict[str, Any]) -> list[str]:
    """The settings that the tuners listed in ``config``'s callbacks choose."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return tuner_settings([import_class(c["class_path"]) for c in callbacks if isinstance(c, dict)])


def _schedule(config: dict[str, Any]) -> Any:
    return ((config.get("model") or {}).get("init_args") or {}).get("lr_scheduler")


# ---------------------------------------------------------------------------------- what a command continues
@dataclass
class Candidate:
    """A run folder with a ``checkpoints/last.ckpt`` and the settings its config differs in."""

    version: int
    checkpoint: Path
    differences: list[str]


def resumable_runs(root: Path, config: dict[str, Any], only_version: int | None = None) -> list[Candidate]:
    """Runs under ``root`` with a ``last.ckpt``, newest first, each with the settings (outside
    :func:`resumable_keys`) in which its saved ``config.yaml`` differs from ``config``."""
    from src.runtime.runs import versions

    keys = resumable_keys(config)
    found = []
    for v in versions(root):
        if only_version is not None and v != only_version:
            continue
        last = root / f"version_{v}" / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        saved_file = root / f"version_{v}" / "config.yaml"
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            differences = [f"(its {saved_file.name} is missing or unreadable)"]
        else:
            differences = config_differences(saved, config, keys)
        found.append(Candidate(v, last, differences))
    return sorted(found, key=lambda c: c.checkpoint.stat().st_mtime, reverse=True)


def resolve_checkpoint(
    subcommand: str | None, ckpt_path: str | None, root: Path | None, config: dict[str, Any], version: Any
) -> tuple[Path | None, Path | None]:
    """The checkpoint file a command loads, and for ``fit`` the run folder it continues (``None``:
    a new one). ``root`` is the logger's ``save_dir/name``; ``version`` narrows ``last`` to one run."""
    if ckpt_path == "last":
        if root is None:
            raise UsageError(
                "--ckpt_path=last needs a logger with a save_dir (it looks for the run's folder)."
            )
        checkpoint = _last(subcommand, root, config, version)
        if checkpoint is None:
            return None, None
        return checkpoint, checkpoint.parents[1] if subcommand == "fit" else None
    if ckpt_path is None or ckpt_path == "best":
        return None, None
    path = Path(ckpt_path)
    if subcommand != "fit":
        return path, None
    problem = continuation_problem(path, config)
    if problem:
        raise UsageError(f"--ckpt_path {path}: {problem}")
    own_run = path.name == "last.ckpt" and path.parent.name == "checkpoints"
    if own_run and (path.parents[1] / "config.yaml").is_file():
        return path, path.resolve().parents[1]  # a run's last.ckpt: that run, wherever it lies
    return path, None


def _last(subcommand: str | None, root: Path, config: dict[str, Any], version: Any) -> Path | None:
    candidates = resumable_runs(root, config, only_version=version)
    matches = [c for c in candidates if not c.differences]
    if subcommand != "fit":
        if not matches:
            raise UsageError(_no_matching_run(root, candidates, version))
        return matches[0].checkpoint
    if not candidates and version is None:
        rank_zero_info(f"--ckpt_path=last: no run under {root} has a last.ckpt yet; starting a new run.")
        return None
    # A finished run is no candidate; a run that differs only in its length says why it cannot go on.
    problems = []
    for c in matches or [c for c in candidates if all(d.split(":")[0] in RUN_LENGTH for d in c.differences)]:
        problem = continuation_problem(c.checkpoint, config)
        if problem is None and not c.differences:
            return c.checkpoint
        if problem is not None:
            problems.append(f"version_{c.version} ({c.checkpoint}): {problem}")
    if problems:
        raise UsageError(f"--ckpt_path=last: {problems[0]}")
    raise UsageError(_no_matching_run(root, candidates, version))


def _no_matching_run(root: Path, candidates: list[Candidate], version: Any) -> str:
    if not candidates:
        where = f"version_{version}" if version is not None else "any run"
        return f"--ckpt_path=last: {where} under {root} has no checkpoints/last.ckpt. Pass a checkpoint file."
    lines = [
        f"--ckpt_path=last: no run under {root} was started with these settings, so none is resumed (a "
        "resume continues the same experiment). The runs with a last.ckpt and what differs (run -> command):"
    ]
    for c in candidates[:5]:
        more = " ..." if len(c.differences) > 6 else ""
        lines.append(f"  version_{c.version}: " + "; ".join(c.differences[:6]) + more)
    lines.append("Pass the settings of the run to resume, or start a new run without --ckpt_path.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- finished runs, run length
def continuation_problem(checkpoint: Path, config: dict[str, Any]) -> str | None:
    """Why ``fit`` with ``config`` cannot continue ``checkpoint``'s run, or ``None``: the run is
    finished, or its schedule is laid out over a length other than the command's."""
    meta = read_metadata(checkpoint)
    run = (yaml.safe_load(meta.get(CONFIG_KEY) or "") or {}).get("trainer") or {}
    run_length, length = _length(run), _length(config.get("trainer") or {})
    epochs, steps = _epochs_done(meta), int(meta.get("global_step", 0))
    spans = spans_the_run(_schedule(config))
    schedule = str((_schedule(config) or {}).get("class_path", "")).rsplit(".", 1)[-1]
    finished = _stopped_early(meta)
    if finished is None and spans and run and _reached(run_length, epochs, steps):
        finished = f"it trained its {_said(run_length, epochs, steps)}, the whole length its {schedule} schedule spans"
    if finished is None and not spans and _reached(length, epochs, steps):
        finished = f"it trained {_said(length, epochs, steps)}"
    if finished is not None:
        more = (
            ""
            if spans
            else "; or pass a larger --trainer.max_epochs/--trainer.max_steps to train it on (its schedule does "
            "not depend on the run's length)"
        )
        return (
            f"that run is finished: {finished}. Nothing is left to train. Test it (python -m src.cli test "
            f"--ckpt_path {_best_of(meta, checkpoint)}), or start a new run without --ckpt_path{more}."
        )
    if spans and run and run_length != length:
        longer = _longer(length, run_length)
        return (
            f"that run's {schedule} learning-rate schedule was laid out over its length ({_limits(run_length)}); "
            f"continuing it with {_limits(length)} would "
            + (
                "train past the schedule's end at its final learning rate"
                if longer
                else "cut the schedule short"
            )
            + f". Resume it with {_limits(run_length, flags=True)}, or start a new run without --ckpt_path."
        )
    return None


def _epochs_done(meta: dict[str, Any]) -> int:
    """Epochs the checkpoint's run finished (Lightning's fit-loop progress; ``epoch`` without it)."""
    progress = (((meta.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current")
    return int((progress or {}).get("processed", meta.get("epoch", 0)))


def _length(trainer: dict[str, Any]) -> tuple[int, int]:
    """``(max_epochs, max_steps)`` as Lightning applies them (-1: no limit)."""
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    if max_epochs is None:  # Lightning's default: 1000 epochs unless steps or time limit the run
        max_epochs = 1000 if max_steps == -1 and trainer.get("max_time") is None else -1
    return int(max_epochs), max_steps


def _reached(length: tuple[int, int], epochs: int, steps: int) -> bool:
    return (length[0] != -1 and epochs >= length[0]) or (length[1] != -1 and steps >= length[1])


def _longer(a: tuple[int, int], b: tuple[int, int]) -> bool:
    unbounded = 10**12
    return tuple(unbounded if v == -1 else v for v in a) > tuple(unbounded if v == -1 else v for v in b)


def _said(length: tuple[int, int], epochs: int, steps: int) -> str:
    if length[1] != -1 and steps >= length[1]:
        return f"{steps} steps (max_steps={length[1]})"
    return f"{epochs} epochs (max_epochs={length[0]})"


def _limits(length: tuple[int, int], flags: bool = False) -> str:
    names = ("--trainer.max_epochs", "--trainer.max_steps") if flags else ("max_epochs", "max_steps")
    parts = [f"{names[0]}={length[0]}"] + ([f"{names[1]}={length[1]}"] if length[1] != -1 else [])
    return " ".join(parts) if flags else ", ".join(parts)


def _stopped_early(meta: dict[str, Any]) -> str | None:
    for key, state in (meta.get("callbacks") or {}).items():
        if isinstance(state, dict) and state.get("stopping_reason", 0):  # EarlyStopping's record
            return f"{str(key).split('{')[0]} ended it after epoch {state.get('stopped_epoch')}"
    return None


def _best_of(meta: dict[str, Any], checkpoint: Path) -> Path:
    """The run's best checkpoint file where it lies now (beside ``checkpoint``), else ``checkpoint``."""
    for state in (meta.get("callbacks") or {}).values():
        best = state.get("best_model_path") if isinstance(state, dict) else None
        if best and (checkpoint.parent / Path(best).name).is_file():
            return checkpoint.parent / Path(best).name
    return checkpoint


# ---------------------------------------------------------------------------------- the continued run
def continue_in(trainer_cfg: Any, run_dir: Path) -> None:
    """Point the run's TensorBoard/CSV loggers at ``run_dir``, the folder of the run being continued,
    wherever it lies (moved, copied, or given by a path from another working directory)."""
    logger = trainer_cfg.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    roots = [_root(lg) for lg in loggers]
    first = next((r for r in roots if r is not None), None)
    version = run_dir.name.removeprefix("version_")
    for lg, root in zip(loggers, roots, strict=True):
        if root is not None and root == first:
            lg.init_args.save_dir = str(run_dir.parents[1])
            lg.init_args.name = run_dir.parent.name
            lg.init_args.version = int(version) if version.isdigit() else run_dir.name


def _root(logger: Any) -> tuple[str, str] | None:
    if (
        not hasattr(logger, "get")
        or str(logger.get("class_path", "")).rsplit(".", 1)[-1] not in _LOGGERS_WITH_FOLDERS
    ):
        return None
    args = logger.get("init_args") or {}
    return str(args.get("save_dir")), str(args.get("name"))


def keep_tuned_values(cfg: Any, checkpoint: Path) -> None:
    """A resumed run keeps the values its tuners chose: the tuners listed in the command are left
    out, and the settings they tune take the checkpoint's values."""
    callbacks = list(cfg.trainer.get("callbacks") or [])
    tuners = [c for c in callbacks if tuner_settings([import_class(c.class_path)])]
    if not tuners:
        return
    meta = read_metadata(checkpoint)
    stored = {
        "model.init_args.lr": (meta.get("hyper_parameters") or {}).get("lr"),
        "data.init_args.batch_size": (meta.get("datamodule_hyper_parameters") or {}).get("batch_size"),
    }
    kept = []
    for key in tuner_settings([import_class(c.class_path) for c in tuners]):
        if stored.get(key) is not None:
            part, _, name = key.split(".")
            setattr(getattr(cfg, part).init_args, name, stored[key])
            kept.append(f"{key}={stored[key]}")
    cfg.trainer.callbacks = [c for c in callbacks if not any(c is t for t in tuners)]
    names = ", ".join(c.class_path.rsplit(".", 1)[-1] for c in tuners)
    rank_zero_info(
        f"{names} left out: a resumed run keeps the values its checkpoint holds ({', '.join(kept)})."
    )


class ResumedRun(Callback):
    """What a run restored from a checkpoint keeps, whatever folder it continues in.

    - ModelCheckpoint's record of the best files (their paths, scores, the top-k): Lightning keeps it
      only when the checkpoint folder's path is unchanged. A run continued in its own folder after
      the folder moved (or from another working directory) keeps it, its paths moved along; a
      checkpoint loaded into another folder starts that folder's record afresh, instead of naming
      files of the run it came from.
    - A schedule restored with another length than this run's is named when training starts.

    The CLI adds it to every run.
    """

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        loaded = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path else None
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
            if not state or callback.dirpath is None or state.get("dirpath") == callback.dirpath:
                continue
            now = Path(callback.dirpath)
            moved = _moved(state, now) if loaded == now.resolve() else None
            if moved is None:
                del states[callback.state_key]
            else:
                states[callback.state_key] = moved

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is None or not spans_the_run(getattr(pl_module, "lr_scheduler", None)):
            return
        steps = trainer.estimated_stepping_batches
        for config in trainer.lr_scheduler_configs:
            total = getattr(config.scheduler, "total_steps", None)
            if isinstance(total, int) and total != steps:
                rank_zero_warn(
                    f"The learning-rate schedule restored from the checkpoint spans {total} optimiser steps, but "
                    f"this run makes {steps} (its devices, limit_train_batches or accumulate_grad_batches differ "
                    "from the run that wrote it): "
                    + (
                        f"after step {total} it holds its final learning rate."
                        if total < steps
                        else "the run ends before the schedule does."
                    )
                )


def _moved(state: dict[str, Any], now: Path) -> dict[str, Any] | None:
    """ModelCheckpoint's record with its files in folder ``now``; ``None`` when a best file is not there."""

    def here(path: Any) -> str:
        return str(now / Path(path).name) if path else path

    best_k = {here(p): score for p, score in (state.get("best_k_models") or {}).items()}
    if not all(Path(p).is_file() for p in best_k) or (
        state.get("best_model_path") and not Path(here(state["best_model_path"])).is_file()
    ):
        return None
    fields = ("best_model_path", "kth_best_model_path", "last_model_path")
    return {**state, **{k: here(state.get(k)) for k in fields}, "best_k_models": best_k, "dirpath": str(now)}
