"""The command line as a user meets it: parse errors in the project's form, config files checked
before they are parsed, and one callback's option set by the callback's name.

- A parse error is ``error: ...`` in a few lines: the bad key or value, the closest valid keys
  (``did you mean --model.init_args.hidden_size?``) and where the options are listed (``--help``,
  ``--model.help CLASS``); the full usage only with ``--help``.
- ``--callbacks.NAME.OPTION=VALUE`` sets ``OPTION`` of the callback of class ``NAME`` in
  ``trainer.callbacks`` (``--callbacks.LastCheckpoint.every_n_train_steps=50``), wherever it is in
  the list; LightningCLI's own ``--trainer.callbacks.OPTION=VALUE`` sets it on the last callback.

The errors are read from jsonargparse's messages (their 4.53 wording, pinned by tests/test_cli.py);
a message of another form is shown by its first line, with where the options are listed.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser

from src.runtime.checks import import_class
from src.runtime.errors import UsageError
from src.runtime.run_state import cli_command

_CALLBACK_OPTION = re.compile(
    r"--callbacks\.(?P<name>[A-Za-z_][\w.]*)\.(?P<option>\w+)(?:=(?P<value>.*))?", re.S
)
# Lines of a nested jsonargparse error that frame the reason (the alternatives it tried).
_NOT_A_REASON = ("Problem with given class_path", "Parser key", "Expected a <class", "Option '")
_STRUCTURE = re.compile(
    r"^\s*(- )?(Does not validate|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>)"
)


class CommandLineParser(LightningArgumentParser):
    """LightningCLI's parser, with the project's errors (:class:`~src.runtime.errors.UsageError`, exit 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's inner parsers: it catches and combines their errors
            super().error(message, ex)
        raise UsageError(explain(message, getattr(ex, "subcommand_parser", None) or self)) from None


# ---------------------------------------------------------------------------------- parse errors
def explain(message: str, parser: ArgumentParser) -> str:
    """jsonargparse's error ``message`` as the project's: what is wrong, the closest valid keys, and
    where the options are listed."""
    sub = _subcommand(parser)
    every = f"Every option: {cli_command([*sub, '--help'])}."
    if m := re.match(r"argument subcommand: invalid choice: '([^']*)'", message):
        commands = ["fit", "validate", "test", "predict"]
        hint = _did_you_mean(m[1], commands)
        return f"unknown command {m[1]!r}.{hint} The commands: {', '.join(commands)}.\n  {every}"
    if m := re.match(r"unrecognized arguments: (.*)", message, re.S):
        unknown = [a.split("=", 1)[0] for a in m[1].split() if a.startswith("-")][:3] or m[1].split()[:1]
        keys = _parser_keys(parser)
        return "\n  ".join(
            [*(f"unknown option {a}.{_did_you_mean(a.lstrip('-'), keys, '--')}" for a in unknown), every]
        )
    if m := re.search(r"(?:does not accept option|Option) '([^']+)'(?: is not accepted)?$", message.strip()):
        # a key in a config file (or a group) that the command does not have
        keys = _parser_keys(parser)
        where = _config_file_with(m[1], parser)
        return f"{m[1]} is not an option{where}{_did_you_mean(m[1], keys)}\n  {every}"
    if m := re.match(r'Parser key "([^"]+)":', message):
        return _explain_key(m[1], message, parser, sub, every)
    if m := re.match(r"Problems parsing config: (.*)", message, re.S):
        return f"a --config value is not valid YAML: {_first_line(m[1])}\n  {every}"
    return f"{_first_line(message)}\n  {every}"


def _explain_key(key: str, message: str, parser: ArgumentParser, sub: list[str], every: str) -> str:
    """An error about one option: an unknown key inside a class's settings, a class that does not
    exist, or a value of the wrong kind."""
    nested = re.search(r"NestedArg\(key='([^']*)', val='((?:[^'\\]|\\.)*)'\)", message)
    class_path = re.search(r"Problem with given class_path '([^']+)'", message)
    given = re.search(r"Given value: (.*)", message)
    if key == "trainer.callbacks" and nested and class_path:
        return _explain_callback_option(nested[1], nested[2], class_path[1], message, parser, every)
    if "Expected a dot import path" in message or "not accessible or invalid" in message:
        value = given[1].strip() if given else "?"
        choices = _subclass_names(message)
        hint = _did_you_mean(value, choices)
        listed = f" The choices: {', '.join(choices)} (or a full import path)." if choices else ""
        return f"--{key}={value}: no such class.{hint}{listed}\n  {every}"
    if class_path is None:
        value = given[1].strip() if given else None
        return f"--{key}{'' if value is None else '=' + value}: {_reason(message)}\n  {every}"
    name = class_path[1].rsplit(".", 1)[-1]
    listed = f"{name}'s options: {cli_command([*sub, f'--{key}.help', name])}. {every}"
    unknown = re.findall(r"Option '([^']+)' is not accepted|Key \"([^\"]+)\" is not expected", message)
    bad = nested[1] if nested else next((a or b for a, b in unknown), None)
    if bad is not None and unknown and bad not in _class_options(class_path[1]):
        hint = _did_you_mean(bad, _class_options(class_path[1]), f"--{key}.init_args.")
        return f"--{key}.init_args.{bad}: {name} has no option {bad!r}.{hint}\n  {listed}"
    value = f"={nested[2]}" if nested else ""
    return f"--{key}.init_args.{bad or '?'}{value}: {_reason(message)}\n  {listed}"


def _reason(message: str) -> str:
    """The most specific line of a nested jsonargparse error, in plain words."""
    lines = [ln.strip(" -") for ln in message.splitlines()[1:] if ln.strip() and not _STRUCTURE.match(ln)]
    lines = [ln for ln in lines if not ln.startswith(_NOT_A_REASON)]
    expected = [e if e != "NoneType" else "null" for e in re.findall(r"Expected a <class '(\w+)'>", message)]
    if not lines and expected:
        return f"expected {' or '.join(expected)}."
    reason = lines[-1] if lines else _first_line(message)
    for pattern, plain in _PLAIN:
        if m := re.search(pattern, reason):
            return plain(m)
    return reason if reason.endswith(".") else reason + "."


def _restriction(text: str) -> str:
    return re.sub(r"\s*(>=|<=|>|<|==)\s*", r" \1 ", text.replace(" and v", " and ")).strip()


# jsonargparse's wording of a bad value, in plain words.
_PLAIN = (
    (
        r"Not of type (\w+): .* does not conform to restriction v(.+)",
        lambda m: f"must be {_restriction(m[2])}.",
    ),
    (r"Not of type (\w+): invalid literal for int\(\)", lambda m: f"not a whole number ({m[1]})."),
    (r"Not of type (\w+): could not convert string to float", lambda m: f"not a number ({m[1]})."),
    (r"Expected a typing\.Literal\[(.*)\]", lambda m: f"must be one of {m[1]}."),
)


def _explain_callback_option(
    option: str, value: str, last: str, message: str, parser: ArgumentParser, every: str
) -> str:
    """``--trainer.callbacks.OPTION=VALUE``: LightningCLI sets it on the last callback of the list."""
    name = last.rsplit(".", 1)[-1]
    if option in _class_options(last):
        return f"{name}'s {option}={value}: {_reason(message)}\n  {every}"
    owners = [n for n, cls in _run_callbacks(parser) if option in _class_options(_path_of(cls))]
    first = (
        f"--trainer.callbacks.{option} sets an option of the last callback in trainer.callbacks "
        f"({name}), which has no option {option!r}."
    )
    if owners:
        fix = " or ".join(f"--callbacks.{n}.{option}={value}" for n in dict.fromkeys(owners))
        return f"{first}\n  Set it on the callback by its name: {fix}. {every}"
    return f"{first} No callback of this run has it.\n  {every}"


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` Did you mean X?`` with the closest of ``choices`` (by the whole key and by its last part)."""
    choices = list(dict.fromkeys(choices))
    by_last = {c.rsplit(".", 1)[-1]: c for c in reversed(choices)}  # the shortest key of a name
    last = word.rsplit(".", 1)[-1]
    if last in by_last and by_last[last] != word:  # the same name elsewhere: that is the one
        return f" Did you mean {prefix}{by_last[last]}?"
    close = [by_last[c] for c in difflib.get_close_matches(last, by_last, n=2, cutoff=0.7)]
    close += difflib.get_close_matches(word, choices, n=2, cutoff=0.6)
    close = [c for c in dict.fromkeys(close) if c != word][:2]
    return f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def _subcommand(parser: ArgumentParser) -> list[str]:
    # A subcommand's parser is named "<prog> [options] <subcommand>".
    prog = str(parser.prog)
    return [prog.rsplit(" ", 1)[-1]] if "[options]" in prog else []


def _parser_keys(parser: ArgumentParser) -> list[str]:
    try:
        return _keys(parser.get_defaults())
    except Exception:  # defaults that do not validate: no suggestions rather than a second error
        return []


def _keys(settings: Namespace) -> list[str]:
    """Every option's dotted key (``Namespace.keys()`` flattens; iterating does not)."""
    return [k for k in settings.keys() if not k.startswith("__")]  # noqa: SIM118


@functools.cache
def _class_options(class_path: str) -> tuple[str, ...]:
    """The settings (``init_args``) of a class, as the command line knows them."""
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(import_class(class_path), fail_untyped=False)
        return tuple(_keys(parser.get_defaults()))
    except Exception:  # a class the parser cannot describe: no suggestions
        return ()


def _subclass_names(message: str) -> list[str]:
    """The classes a subclass option may name: the concrete subclasses of the base in ``message``."""
    base = re.search(r"Subtypes: \[<class '([^']+)'>", message)
    if not base:
        return []
    found, todo = set(), [import_class(base[1])]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if not cls.__subclasses__():
                found.add(cls.__name__)
    return sorted(found)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "the command line could not be parsed"


# ---------------------------------------------------------------------------------- config files
def _config_values(args: Iterable[str]) -> list[str]:
    """The values given to ``--config``/``-c``: file paths, or YAML text (a checkpoint's stored config)."""
    args, values = list(args), []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` file that does not exist or is not a YAML mapping, naming the file, line
    and column (jsonargparse's own message names neither)."""
    for value in _config_values(args):
        path = Path(value)
        if "\n" in value or not value.endswith((".yaml", ".yml", ".json")) and not path.exists():
            continue  # YAML text, not a file name
        if not path.is_file():
            raise UsageError(
                f"--config {value}: no such file. Pass the path of a YAML config (configs/*.yaml)."
            )
        try:
            settings = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"--config {value} is not valid YAML: {problem}{where}. Fix the file.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {value} cannot be read: {err}") from None
        if settings is not None and not isinstance(settings, dict):
            raise UsageError(
                f"--config {value} holds a {type(settings).__name__}, not settings (key: value lines "
                "such as `trainer:` and `model:`, as in configs/*.yaml)."
            )


def _config_file_with(dotted: str, parser: ArgumentParser) -> str:
    """`` (in FILE)`` for the config file that sets the key ``dotted``."""
    for value in _config_values(getattr(parser, "args", None) or []):
        path = Path(value)
        settings = yaml.safe_load(path.read_text()) if path.is_file() else None
        node: Any = settings
        for part in dotted.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            return f" (set in {value})."
    return "."


def _run_callbacks(parser: ArgumentParser) -> list[tuple[str, type]]:
    """(short name, class) of the callbacks the command's config files list."""
    entries: list[Any] = []
    for value in _config_values(getattr(parser, "args", None) or []):
        path = Path(value)
        with_settings = yaml.safe_load(path.read_text() if path.is_file() else value)
        if isinstance(with_settings, dict):
            listed = (with_settings.get("trainer") or {}).get("callbacks") or []
            entries += listed if isinstance(listed, list) else [listed]
    found = []
    for entry in entries:
        name = entry.get("class_path") if isinstance(entry, dict) else entry
        cls = _callback_class(str(name))
        if cls is not None:
            found.append((cls.__name__, cls))
    return found


def _callback_class(name: str) -> type | None:
    """A callback class by import path or by the short name a config may use."""
    if "." in name:
        try:
            return import_class(name)
        except (ImportError, AttributeError):
            return None
    todo: list[type] = [Callback]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo += cls.__subclasses__()
    return None


def _path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------- callback options
@dataclass(frozen=True)
class CallbackOption:
    """``--callbacks.NAME.OPTION=VALUE``: one option of the callback of class ``NAME``."""

    name: str
    option: str
    value: str

    @property
    def flag(self) -> str:
        return f"--callbacks.{self.name}.{self.option}"


def split_callback_options(args: list[str]) -> tuple[list[str], list[CallbackOption]]:
    """``args`` less the ``--callbacks.NAME.OPTION[=]VALUE`` options, and those options."""
    rest, found, i = [], [], 0
    while i < len(args):
        m = _CALLBACK_OPTION.fullmatch(args[i])
        if m is None:
            rest.append(args[i])
        elif m["value"] is not None:
            found.append(CallbackOption(m["name"], m["option"], m["value"]))
        elif i + 1 < len(args):
            found.append(CallbackOption(m["name"], m["option"], args[i + 1]))
            i += 1
        else:
            raise UsageError(f"{args[i]} needs a value: {args[i]}=VALUE.")
        i += 1
    return rest, found


def callback_option_args(
    parser: ArgumentParser, config: Namespace, options: list[CallbackOption]
) -> list[str]:
    """LightningCLI options that rebuild ``trainer.callbacks`` of the parsed ``config`` with
    ``options`` applied, each to the one callback of its class: the list entry by entry
    (``--trainer.callbacks+=ENTRY``), each followed by its options (which apply to the last entry),
    so the parser checks every value and ``--print_config`` and ``config.yaml`` show them."""
    sub = config.get("subcommand")
    dumped = yaml.safe_load(parser.dump(config, skip_unset=False))
    trainer = (dumped.get(sub, dumped) if sub else dumped).get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    names = [str(c.get("class_path", "")).rsplit(".", 1)[-1] for c in callbacks]
    for opt in options:
        count = names.count(opt.name.rsplit(".", 1)[-1])
        if count != 1:
            listed = ", ".join(names) or "none"
            raise UsageError(
                f"{opt.flag}: trainer.callbacks holds {count or 'no'} {opt.name} "
                f"callback{'s' if count > 1 else ''} (this run's callbacks: {listed}). "
                + (
                    f"Add one with --trainer.callbacks+={opt.name}."
                    if not count
                    else "Set the option in the config, on the entry you mean."
                )
            )
    for opt in options:
        entry = callbacks[names.index(opt.name.rsplit(".", 1)[-1])]
        known = _class_options(str(entry["class_path"]))
        if known and opt.option not in known:
            hint = _did_you_mean(opt.option, known, f"--callbacks.{opt.name}.")
            raise UsageError(f"{opt.flag}: {opt.name} has no option {opt.option!r}.{hint}")
    args: list[str] = []
    for i, (name, entry) in enumerate(zip(names, callbacks, strict=True)):
        args.append(f"--trainer.callbacks{'=' if i == 0 else '+='}{json.dumps([entry] if i == 0 else entry)}")
        args += [
            f"--trainer.callbacks.{o.option}={o.value}" for o in options if o.name.rsplit(".", 1)[-1] == name
        ]
    return args
