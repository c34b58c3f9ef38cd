"""The search space (``--space KEY=TYPE(ARGS)``) and the pruner (``--pruner NAME(ARGS)``) as given on
the command line. Imports no Optuna at module level: ``--help`` and bad input answer at once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from src.runtime.errors import UsageError
from src.tools.ablate import split_top_level

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Param:
    """One ``--space`` entry: a CLI key and the distribution of its values."""

    key: str
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """The trial's value (sampled, or the stored one for a trial run again)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        suggest = trial.suggest_int if self.kind == "int" else trial.suggest_float
        return suggest(self.key, *self.probe_values(), log=self.log)

    def override(self, value: Any) -> str:
        return f"--{self.key}={format_value(value)}"

    def probe_values(self) -> list[Any]:
        """Values the CLI must accept before the search starts: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    @property
    def spec(self) -> str:
        """The canonical ``--space`` text (what a study records)."""
        args = [*map(format_value, self.probe_values()), *(["log"] if self.log else [])]
        return f"{self.key}={self.kind}({','.join(args)})"


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SPEC = re.compile(r"^(?P<kind>[A-Za-z_]+)\((?P<args>.*)\)$", re.S)
_EXAMPLE = "e.g. --space 'model.init_args.dropout=float(0.0,0.5)'"
_TYPES = "float(LOW,HIGH[,log]), int(LOW,HIGH[,log]) or choice(A,B,...)"


def parse_space(text: str) -> Param:
    """``KEY=float(lo,hi[,log])`` | ``KEY=int(lo,hi[,log])`` | ``KEY=choice(a,b,...)`` → :class:`Param`;
    a :class:`UsageError` naming the spec and what is wrong with it."""
    where = f"--space {text!r}"
    key, sep, dist = text.partition("=")
    key, dist = key.strip().removeprefix("--"), dist.strip()
    if not sep or not key or not dist:
        raise UsageError(f"{where}: expected KEY=TYPE(ARGS), {_EXAMPLE}")
    if not _KEY.match(key):
        raise UsageError(f"{where}: {key!r} is not a CLI key (dotted names such as model.init_args.dropout)")
    match = _SPEC.match(dist)
    if not match:
        raise UsageError(f"{where}: expected {_TYPES} after '=', {_EXAMPLE}")
    kind, args = match["kind"], split_top_level(match["args"])
    if kind == "choice":
        if "" in args:
            raise UsageError(f"{where}: an empty choice; remove the extra comma")
        if len(args) < 2:
            raise UsageError(f"{where}: choice needs at least two values (a fixed value goes after `--`)")
        if len(set(args)) != len(args):
            raise UsageError(f"{where}: a choice is repeated")
        return Param(key, "choice", choices=tuple(args))
    if kind not in ("float", "int"):
        raise UsageError(f"{where}: unknown type {kind!r}; use {_TYPES}")
    log = len(args) == 3 and args[2] == "log"
    if len(args) not in (2, 3) or (len(args) == 3 and not log):
        raise UsageError(f"{where}: {kind} takes LOW,HIGH and optionally log, e.g. {kind}(1,10,log)")
    try:
        low, high = map(float if kind == "float" else int, args[:2])
    except ValueError:
        raise UsageError(
            f"{where}: LOW and HIGH must be {'numbers' if kind == 'float' else 'integers'}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"{where}: LOW and HIGH must be finite")
    if low >= high:
        raise UsageError(f"{where}: LOW must be below HIGH (a fixed value goes after `--`)")
    if log and low <= 0:
        raise UsageError(f"{where}: a log range needs LOW > 0")
    return Param(key, kind, low, high, log)


def format_value(value: Any) -> str:
    # repr keeps every digit of a float, so the run gets exactly the value the study records.
    return repr(value) if isinstance(value, float) else str(value)


def labels(space: list[Param]) -> dict[str, str]:
    """Short column names: the last part of each key, or the whole key where two would clash."""
    short = {p.key: p.key.rsplit(".", 1)[-1] for p in space}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def baseline_params(config: dict[str, Any], space: list[Param]) -> tuple[dict[str, Any], list[str]]:
    """The config's own value of every searched key, as a trial's params; and the keys that cannot be.
    A choice matches when its text reads (as YAML) to the config's value (``[512,256]``, ``true``)."""
    params, outside = {}, []
    for p in space:
        node = lookup(config, p.key)
        if p.kind == "choice":
            match = [c for c in p.choices if _yaml_value(c) == node]
            if match:
                params[p.key] = match[0]
                continue
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and p.low <= node <= p.high:
            params[p.key] = int(node) if p.kind == "int" else float(node)
            continue
        outside.append(f"{p.key}={node!r}")
    return params, outside


def lookup(config: Any, key: str) -> Any:
    """The value at a dotted ``key`` of a resolved config (``None`` where it has none)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --pruner NAME: Optuna's NAME + "Pruner" class
PRUNERS = dict(
    median="Median", halving="SuccessiveHalving", hyperband="Hyperband", threshold="Threshold", none="Nop"
)


def build_pruner(spec: str) -> optuna.pruners.BasePruner:
    """``median`` / ``halving(min_resource=2,reduction_factor=3)`` / ``none`` → an Optuna pruner."""
    import optuna

    name, _, rest = spec.strip().partition("(")
    if name.strip() not in PRUNERS or (rest and not rest.endswith(")")):
        raise UsageError(
            f"--pruner {spec!r}: use one of {', '.join(PRUNERS)}, e.g. 'median(n_warmup_steps=3)'"
        )
    kwargs: dict[str, Any] = {}
    for item in split_top_level(rest[:-1]) if rest[:-1].strip() else []:
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"--pruner {spec!r}: arguments are NAME=VALUE, e.g. n_warmup_steps=3")
        kwargs[k.strip()] = yaml.safe_load(v)
    try:
        return getattr(optuna.pruners, PRUNERS[name.strip()] + "Pruner")(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--pruner {spec!r}: {err}") from None
