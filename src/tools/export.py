"""Export a trained checkpoint's model to ONNX or ``torch.export`` (``.pt2``), with a JSON sidecar and
a parity check.

    python -m src.tools.export --ckpt_path lightning_logs/<run>/version_0/checkpoints/last.ckpt
    python -m src.tools.export --ckpt_path <ckpt> --format pt2 --output exported/fashion
    python -m src.tools.export --ckpt_path <ckpt> --output exported/ag_news --overwrite --samples 512

The output folder (default: ``<checkpoint folder>/<checkpoint name>-<format>/``) holds

- ``model.onnx`` (or ``model.pt2``, a ``torch.export`` program): the network in inference form
  (BatchNorm with its running statistics, dropout off) taking the model's input batch and returning
  logits, with a dynamic batch axis (and a dynamic sequence axis for text);
- ``model.json``: everything needed to feed it: class names, input and output spec (symbolic
  dims), the preprocessing as the DataModule describes it (``describe_raw_inputs``: Fashion-MNIST's
  mean/std; AG News's tokenizer steps and patterns, vocabulary, max/min length and pad/unk ids), and
  the parity result.

Before anything is written, the exported file is loaded back (onnxruntime, or ``torch.export.load``)
and compared with the checkpoint's PyTorch model on real inputs (the checkpoint's test split, batched
and transformed as ``predict`` does; synthetic inputs, with a notice, when that data is not
available) in batches of several sizes: the largest logit difference must stay within
``--tolerance`` and every argmax must agree. The folder is written under a temporary name next to
the target and renamed into place, so a failure (bad checkpoint, exporter error, parity failure,
unwritable folder) leaves nothing half-written. Errors print one ``error: ...`` line; exit status
2 for bad arguments, checkpoints or output folders, 1 when the export itself or the parity check fails.

ONNX needs the ``serve`` extra (``pip install -e ".[serve]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from src.runtime.startup import fast_exit, heavy_imports

with heavy_imports():  # torch and Lightning: see src/runtime/startup.py
    import torch
    from torch import Tensor, nn

    from src.data.base import ClassificationDataModule
    from src.runtime.devices import cpu_threads
    from src.runtime.errors import RunFailure, UsageError, exit_on_error
    from src.tools.inference import load_for_inference

FORMAT_VERSION = 1
FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
SIDECAR = "model.json"
DEFAULT_TOLERANCE = 1e-4  # absolute, on logits (float32 kernels of two runtimes differ by ~1e-6)
OUTPUT_NAME = "logits"


class ExportError(RunFailure):
    """The exporter or the parity check failed (exit 1); bad arguments are :class:`UsageError`."""


@dataclass
class Parity:
    """How the exported model's logits compare with the PyTorch model's."""

    runtime: str
    inputs: str
    samples: int
    batch_sizes: list[int]
    max_abs_diff: float
    tolerance: float
    argmax_agree: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_agree == self.samples

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        sizes = f"{min(self.batch_sizes)}-{max(self.batch_sizes)}"
        return (
            f"parity ({self.runtime} vs PyTorch) on {self.inputs}, in {len(self.batch_sizes)} batches of "
            f"{sizes}: max |logit difference| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}), "
            f"argmax identical for {self.argmax_agree}/{self.samples}: {verdict}"
        )


# ------------------------------------------------------------------------------ the network
def inference_network(model: nn.Module) -> nn.Module:
    """A copy of the model's network in eval mode (BatchNorm on its running statistics, no dropout;
    BN-CNN's masked BatchNorm then needs no boolean indexing, which ``torch.export`` cannot trace)."""
    net = copy.deepcopy(getattr(model, "net", model)).eval()
    net.requires_grad_(False)
    return net


def _dynamic_dims(spec: dict[str, Any]) -> dict[int, Any]:
    """``torch.export`` dims for the input's named (variable) axes: ``"batch"``, ``"sequence"``, ..."""
    return {i: torch.export.Dim(d, min=1) for i, d in enumerate(spec["shape"]) if isinstance(d, str)}


def _example(batch: Tensor) -> Tensor:
    # torch.export specialises sizes 0 and 1, so the traced example has a batch of at least 2.
    return batch[:4] if len(batch) >= 2 else torch.cat([batch, batch])


# ------------------------------------------------------------------------------ writers and runners
def write_onnx(net: nn.Module, example: Tensor, spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """Export with the ``torch.export``-based ONNX exporter; return facts for the sidecar."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"ONNX export needs the serve extra ({err.name} is not installed): pip install -e '.[serve]'"
        ) from err
    log = io.StringIO()
    # The exporter logs a warning per torchvision operator it cannot register (torchvision is not needed).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                input_names=[spec["name"]],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(_dynamic_dims(spec),),
                external_data=False,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as err:
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        raise ExportError(
            f"the ONNX exporter failed: {_first_line(err)}" + (f"\n{tail}" if tail else "")
        ) from err
    proto = onnx.load(str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset}


def write_pt2(net: nn.Module, example: Tensor, spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """``torch.export.export`` the network with the input's dynamic axes and ``torch.export.save`` it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(net, (example,), dynamic_shapes=(_dynamic_dims(spec),))
            torch.export.save(program, str(path))
    except Exception as err:
        raise ExportError(f"torch.export failed: {_first_line(err)}") from err
    return {}


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


WRITERS = {"onnx": write_onnx, "pt2": write_pt2}


def load_runner(path: Path, fmt: str) -> tuple[Callable[[Tensor], Tensor], str]:
    """A function running the exported file on an input batch, and the runtime's name."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        return run_onnx, f"onnxruntime {ort.__version__}"
    module = torch.export.load(str(path)).module()

    def run_program(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(x)

    return run_program, "torch.export.load"


def batch_sizes(n: int) -> list[int]:
    """Batches of several sizes (1, 2, 7, then up to 128) covering ``n`` samples, to exercise the
    dynamic axes."""
    sizes, start = [], 0
    for size in (1, 2, 7):
        if start + size <= n:
            sizes.append(size)
            start += size
    while start < n:
        sizes.append(min(128, n - start))
        start += sizes[-1]
    return sizes


def parity_batches(
    datamodule: ClassificationDataModule, samples: int, seed: int = 0
) -> tuple[list[Tensor], str, bool]:
    """Model inputs for the parity check, in batches of :func:`batch_sizes`.

    Up to ``samples`` samples of the checkpoint's test split, each batch collated and transformed as
    ``predict`` does it (text batches trimmed to their longest text, so the sequence axis varies too);
    ``samples`` synthetic inputs (``example_inputs``) when the data source cannot be read (moved,
    offline). Returns the batches, where they come from (and why), and whether they are real.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datamodule.prepare_data()
            datamodule.setup("test")
            split = datamodule.splits["test"]
        batches, start = [], 0
        for size in batch_sizes(min(samples, len(split[0]))):
            batch = datamodule.collate(tuple(t[start : start + size] for t in split))
            batches.append(datamodule.transform_batch(batch, training=False)[0].cpu())
            start += size
        return batches, f"{start} samples of the test split", True
    except Exception as err:  # any data-source failure: check on synthetic inputs instead, and say so
        generator = torch.Generator().manual_seed(seed)
        batches = [datamodule.example_inputs(size, generator) for size in batch_sizes(samples)]
        return (
            batches,
            f"{samples} synthetic inputs (the test data is not available: {_first_line(err)})",
            False,
        )


def check_parity(
    model: nn.Module,
    run: Callable[[Tensor], Tensor],
    runtime: str,
    batches: list[Tensor],
    inputs: str,
    tolerance: float,
) -> Parity:
    """Compare the exported model's logits with the checkpoint's PyTorch model, batch by batch."""
    max_diff, agree, total = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches:
            ref = model(batch).float()
            got = run(batch).float()
            if got.shape != ref.shape:
                raise ExportError(
                    f"the exported model returned shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}"
                )
            max_diff = max(max_diff, float((got - ref).abs().max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(batch)
    return Parity(runtime, inputs, total, [len(b) for b in batches], max_diff, tolerance, agree)


# ------------------------------------------------------------------------------ sidecar
def sidecar(
    model: nn.Module,
    datamodule: ClassificationDataModule,
    fmt: str,
    facts: dict[str, Any],
    parity: Parity,
    ckpt_path: Path,
) -> dict[str, Any]:
    """The ``model.json`` description: enough to run the model from raw inputs without this project."""
    names = list(model.class_names)
    return {
        "format_version": FORMAT_VERSION,
        "exported_by": "python -m src.tools.export (bn-classifiers)",
        "model": {
            "file": FORMATS[fmt],
            "format": fmt,
            **({"opset": facts["opset"]} if facts.get("opset") else {}),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "mode": "inference: BatchNorm uses its running statistics, dropout is off",
            "torch_version": torch.__version__,
        },
        "checkpoint": {"file": ckpt_path.name, "sha256": _sha256(ckpt_path)},
        "class_names": names,
        "inputs": [datamodule.model_input_spec()],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(names)]}],
        "postprocessing": "softmax over the last axis gives the class probabilities; argmax indexes class_names",
        "preprocessing": datamodule.describe_raw_inputs(),
        "parity": {**asdict(parity), "passed": parity.passed},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ the export
def default_output(ckpt_path: Path, fmt: str) -> Path:
    return ckpt_path.parent / f"{ckpt_path.stem}-{fmt}"


def export(
    ckpt_path: str | Path,
    fmt: str = "onnx",
    output: str | Path | None = None,
    overwrite: bool = False,
    samples: int = 256,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> tuple[Path, Parity]:
    """Export, check parity, and move the finished folder into place. See the module docstring."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if not tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0, got {tolerance}")
    ckpt = Path(ckpt_path)
    model, datamodule = load_for_inference(ckpt)
    target = Path(output) if output is not None else default_output(ckpt, fmt)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(
            f"the output folder {str(target)!r} exists and is not empty. Pass --overwrite or another --output."
        )
    spec = datamodule.model_input_spec()
    tmp, created = _make_temp_folder(target)
    try:
        batches, source, real = parity_batches(datamodule, samples)
        if not real:
            log(f"notice: checking parity on {source}")
        file = tmp / FORMATS[fmt]
        facts = WRITERS[fmt](inference_network(model), _example(max(batches, key=len)), spec, file)
        run, runtime = load_runner(file, fmt)
        parity = check_parity(model, run, runtime, batches, source, tolerance)
        if not parity.passed:
            raise ExportError(f"{parity.summary()}. Nothing was written.")
        description = sidecar(model, datamodule, fmt, facts, parity, ckpt)
        (tmp / SIDECAR).write_text(
            json.dumps(description, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _move_into_place(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise UsageError(f"cannot write the output folder {str(target)!r}: {err}") from err
        raise
    size = (target / FORMATS[fmt]).stat().st_size
    log(f"Exported {type(model).__name__} from {ckpt} to {target}/")
    log(
        f"  {FORMATS[fmt]}  ({size / 1024:.0f} KiB; input {spec['name']!r} {spec['dtype']} {spec['shape']} -> "
        f"{OUTPUT_NAME!r} float32 ['batch', {len(description['class_names'])}])"
    )
    log(f"  {SIDECAR}  (class names, input spec, preprocessing: {description['preprocessing']['kind']})")
    log(f"  {parity.summary()}")
    if not description["preprocessing"].get("self_contained", True):
        log(
            f"notice: {SIDECAR} does not describe all of {type(datamodule).__name__}'s preprocessing (its "
            "transform_batch): feed the exported model through this project's code, or describe it in the "
            "DataModule's describe_raw_inputs()."
        )
    return target, parity


def _make_temp_folder(target: Path) -> tuple[Path, list[Path]]:
    """A fresh temporary folder next to ``target`` (same filesystem: the final rename is atomic), and
    the parent folders created for it (removed again if the export fails)."""
    parent = target.absolute().parent
    missing = []
    probe = parent
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); the export is an ordinary folder
    except OSError as err:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = err.strerror or str(err)
        if not probe.is_dir():
            reason = f"{str(probe)!r} is a file, not a folder"
        raise UsageError(
            f"cannot write the output folder {str(target)!r}: {reason}. Pass a writable folder with --output."
        ) from err
    return tmp, list(reversed(missing))


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to ``target``; an existing one (``--overwrite``) goes only after."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)  # put the previous export back
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)


# ------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.export",
        description="Export a checkpoint's model to ONNX or torch.export (.pt2) with a JSON sidecar, after a "
        "parity check.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `python -m src.cli fit`")
    parser.add_argument("--format", default="onnx", choices=sorted(FORMATS), help="default: onnx")
    parser.add_argument(
        "--output", default=None, help="output folder (default: <ckpt folder>/<ckpt name>-<format>)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--samples", type=int, default=256, help="inputs compared in the parity check (default 256)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest absolute logit difference accepted (default {DEFAULT_TOLERANCE:g})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(cpu_threads())
    with exit_on_error():
        export(args.ckpt_path, args.format, args.output, args.overwrite, args.samples, args.tolerance)


if __name__ == "__main__":
    with fast_exit():
        main()
