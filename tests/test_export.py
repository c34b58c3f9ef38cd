"""`python -m src.tools.export`: ONNX and torch.export (.pt2) export with a sidecar, parity with the
checkpoint, clean failures.

Needs the serve extra (onnx, onnxscript, onnxruntime); skipped without it. The tiny checkpoints come
from tests/helpers/serving.py (fitted once per session, ~40 s for the four configs).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the serve extra (onnxruntime) is not installed")
onnx = pytest.importorskip("onnx", reason="the serve extra (onnx) is not installed")
pytest.importorskip("onnxscript", reason="the serve extra (onnxscript, for torch.onnx) is not installed")

from src.runtime.errors import UsageError  # noqa: E402
from src.tools import export as ex  # noqa: E402
from src.tools.inference import load_for_inference  # noqa: E402
from tests.helpers.serving import CONFIG_NAMES, run_module, tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow  # each test trains or serves a model in a subprocess


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name)


@pytest.fixture(scope="module")
def onnx_export(runs_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python -m src.tools.export`` (ONNX) of a config's tiny checkpoint, run once per config for the
    module: its stdout and output folder (each in a folder of its own, to check for leftovers)."""
    done: dict[str, tuple[str, Path]] = {}

    def get(name: str) -> tuple[str, Path]:
        if name not in done:
            out = tmp_path_factory.mktemp(f"onnx_{name}") / "exported"
            ckpt = tiny_checkpoint(name, runs_root)
            proc = run_module(
                "src.tools.export", "--ckpt_path", str(ckpt), "--output", str(out), "--samples", "64"
            )
            done[name] = proc.stdout, out
        return done[name]

    return get


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_onnx_export_matches_the_checkpoint_through_onnxruntime(name: str, runs_root: Path, onnx_export):
    ckpt = tiny_checkpoint(name, runs_root)
    stdout, out = onnx_export(name)
    assert "parity (onnxruntime" in stdout and ": PASS" in stdout, stdout
    assert "synthetic" not in stdout  # the tiny data is there: real samples
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx"]
    assert _leftovers(out.parent) == []

    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    model, datamodule = load_for_inference(ckpt)
    spec = datamodule.model_input_spec()
    assert meta["format_version"] == ex.FORMAT_VERSION
    assert meta["class_names"] == list(model.class_names)
    assert meta["inputs"] == [spec] and spec["shape"][0] == "batch"
    assert meta["preprocessing"]["self_contained"]  # every shipped DataModule describes its steps
    assert meta["parity"]["passed"] and meta["parity"]["samples"] > 1

    # BatchNorm and dropout in inference form: no Dropout node, no BatchNormalization in training mode
    graph = onnx.load(str(out / "model.onnx")).graph
    assert "Dropout" not in {n.op_type for n in graph.node}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            assert all(not (a.name == "training_mode" and a.i) for a in node.attribute)
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == spec["shape"]  # "batch" (and "sequence") dynamic

    # The same check here, on real samples in batches of several sizes (and text lengths).
    batches, _, real = ex.parity_batches(datamodule, 64)
    assert real
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in batches:
        got = session.run(None, {spec["name"]: batch.numpy()})[0]
        with torch.inference_mode():
            want = model(batch).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=ex.DEFAULT_TOLERANCE)
        assert (got.argmax(1) == want.argmax(1)).all()


# ---------------------------------------------------------------------- the sidecar is self-contained
def _sidecar_tokenize(text: str, tok: dict) -> list[str]:
    """The tokenizer rebuilt from model.json alone (re and html only, no project code)."""
    if not text:
        return []
    for step in tok["preprocess"]:
        kind = step["step"]
        if kind == "replace":
            text = re.sub(step["pattern"], step["with"], text)
        elif kind == "prefix_entities":
            text = re.sub(step["pattern"], lambda m: "&" + m.group(1), text)
        elif kind == "html_unescape":
            text = html.unescape(text)
        elif kind == "translate":
            text = text.translate({ord(k): v for k, v in step["table"].items()})
        elif kind == "lowercase":
            text = text.lower()
        elif kind == "collapse_whitespace":
            text = " ".join(text.split())
        else:
            raise AssertionError(f"unknown step {kind}")
    return re.findall(tok["token_pattern"], text)


def _sidecar_encode(texts: list[str], meta: dict) -> np.ndarray:
    pre = meta["preprocessing"]
    index = {t: i for i, t in enumerate(pre["vocabulary"])}
    ids = [
        [index.get(t, pre["unk_id"]) for t in _sidecar_tokenize(s, pre["tokenizer"])[: pre["max_length"]]]
        for s in texts
    ]
    width = max([pre["min_length"], *map(len, ids)])
    return np.array([row + [pre["pad_id"]] * (width - len(row)) for row in ids], dtype=np.int64)


def test_text_sidecar_encodes_raw_text_without_project_code(runs_root: Path, onnx_export):
    ckpt = tiny_checkpoint("ag_news_cnn_bn", runs_root)
    _, out = onnx_export("ag_news_cnn_bn")  # the export the parity test above checked
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    texts = [
        "Wall St.\\band #36;5 &lt;b&gt;Bears&lt;/b&gt; can't stop",
        "",
        "   \t ",
        "Stocks and PROFIT rise on the oil market (Reuters) http://x.y/z",
        "coach " * 80,
        "Ünïcödé 東京 ☃ — “quoted” ‘single’",
    ]
    model, datamodule = load_for_inference(ckpt)
    ids = _sidecar_encode(texts, meta)
    served = datamodule.raw_inputs_to_batch([datamodule.parse_raw_input(t) for t in texts])
    np.testing.assert_array_equal(ids, served.numpy())  # as the server encodes them ...
    predict_ids, _ = datamodule.encode_texts(texts)
    np.testing.assert_array_equal(ids, predict_ids.numpy())  # ... and `predict` does
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"token_ids": ids})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with torch.inference_mode():
        want = torch.softmax(model(served), -1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)


def test_image_sidecar_normalisation_is_the_datamodules(runs_root: Path, tmp_path: Path):
    ckpt = tiny_checkpoint("fashion_mnist_mlp_bn", runs_root)
    _, datamodule = load_for_inference(ckpt)
    norm = datamodule.describe_raw_inputs()["normalisation"]
    assert (norm["mean"], norm["std"]) == (datamodule.mean, datamodule.std)
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    from_json = (pixels.numpy().astype(np.float32) * norm["scale"] - norm["mean"]) / norm["std"]
    expected = datamodule.transform_batch((pixels,), training=False)[0]
    np.testing.assert_allclose(from_json, expected.numpy(), rtol=0, atol=1e-6)
    served = datamodule.raw_inputs_to_batch([datamodule.parse_raw_input(p.tolist()) for p in pixels])
    assert torch.equal(served, expected)


# ---------------------------------------------------------------------- torch.export (.pt2)
def test_pt2_export_round_trips_with_parity(runs_root: Path, tmp_path: Path):
    ckpt = tiny_checkpoint("ag_news_cnn_bn", runs_root)  # dynamic batch and sequence axes
    out = tmp_path / "pt2"
    proc = run_module("src.tools.export", "--ckpt_path", str(ckpt), "--format", "pt2", "--output", str(out))
    assert "parity (torch.export.load vs PyTorch)" in proc.stdout and ": PASS" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt2"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"]["file"] == "model.pt2" and meta["parity"]["passed"]
    module = torch.export.load(str(out / "model.pt2")).module()
    model, datamodule = load_for_inference(ckpt)
    for texts in (["one"], ["Stocks rise on oil", "", "coach league " * 20]):  # other batch sizes and lengths
        x = datamodule.raw_inputs_to_batch([datamodule.parse_raw_input(t) for t in texts])
        with torch.inference_mode():
            torch.testing.assert_close(module(x), model(x), rtol=0, atol=ex.DEFAULT_TOLERANCE)


# ---------------------------------------------------------------------- failures write nothing
def _bad_checkpoints(good: Path, folder: Path) -> dict[str, Path]:
    ckpt = torch.load(good, weights_only=True)
    paths = {"missing": folder / "missing.ckpt"}
    paths["truncated"] = folder / "truncated.ckpt"
    paths["truncated"].write_bytes(good.read_bytes()[:4000])
    paths["not a checkpoint"] = folder / "notes.ckpt"
    paths["not a checkpoint"].write_text("not a checkpoint")
    mismatched = {**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "hidden_sizes": [32]}}
    paths["mismatched"] = folder / "mismatched.ckpt"
    torch.save(mismatched, paths["mismatched"])
    paths["weights only"] = folder / "weights.ckpt"
    torch.save({"state_dict": ckpt["state_dict"]}, paths["weights only"])
    no_state = {k: v for k, v in ckpt.items() if k != "FashionMNIST"}
    paths["no normalisation"] = folder / "no_state.ckpt"
    torch.save(no_state, paths["no normalisation"])
    return paths


def test_bad_or_mismatched_checkpoints_stop_with_a_message_and_write_nothing(runs_root: Path, tmp_path: Path):
    good = tiny_checkpoint("fashion_mnist_mlp_bn", runs_root)
    messages = {
        "missing": "is not a file: nothing is at that path",
        "truncated": "could not read checkpoint",
        "not a checkpoint": "checkpoint",  # src.runtime.checkpoints' message for a file torch.load refuses
        "mismatched": "do not fit",
        "weights only": "does not name its model class",
        "no normalisation": "no Fashion-MNIST normalisation",
    }
    for case, path in _bad_checkpoints(good, tmp_path).items():  # in-process: fast
        with pytest.raises(UsageError, match=re.escape(messages[case])) as info:
            ex.export(path, "onnx", tmp_path / "out" / case, log=lambda _: None)
        assert info.value.exit_code == 2, case
        assert not (tmp_path / "out").exists(), case
    # As a user runs it: one message, exit status 2. Every refusal above reaches the user through the
    # same handler (src.runtime.errors.exit_on_error), as the unwritable output folder below does.
    case = "mismatched"
    path = _bad_checkpoints(good, tmp_path)[case]
    proc = run_module(
        "src.tools.export", "--ckpt_path", str(path), "--output", str(tmp_path / "out"), check=False
    )
    assert proc.returncode == 2, (case, proc.stderr)
    assert proc.stderr.startswith("error: ") and messages[case] in proc.stderr, (case, proc.stderr)
    assert "Traceback" not in proc.stderr, (case, proc.stderr)
    assert not (tmp_path / "out").exists(), case


def test_unwritable_or_existing_output_folders(runs_root: Path, tmp_path: Path):
    ckpt = tiny_checkpoint("mnist1d_resnet_bn", runs_root)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_module(
        "src.tools.export", "--ckpt_path", str(ckpt), "--output", str(blocker / "sub" / "out"), check=False
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: ")
        and "is a file, not a folder" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "x"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="cannot write the output folder"):
            ex.export(ckpt, "onnx", locked / "out", log=lambda _: None)
        assert list(locked.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        ex.export(ckpt, "onnx", existing, log=lambda _: None)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    ex.export(ckpt, "onnx", existing, overwrite=True, samples=8, log=lambda _: None)
    assert sorted(p.name for p in existing.iterdir()) == ["model.json", "model.onnx"]
    assert _leftovers(tmp_path) == []


def test_a_failed_parity_check_writes_nothing(runs_root: Path, tmp_path: Path, monkeypatch):
    ckpt = tiny_checkpoint("mnist1d_resnet_bn", runs_root)
    real_runner = ex.load_runner

    def far_off(path: Path, fmt: str):
        run, name = real_runner(path, fmt)
        return (lambda x: run(x) + 0.5), name  # far beyond the tolerance on any CPU

    monkeypatch.setattr(ex, "load_runner", far_off)
    out = tmp_path / "parent" / "out"
    with pytest.raises(ex.ExportError, match=r"max \|logit difference\| \S+ \(tolerance .*: FAIL") as caught:
        ex.export(ckpt, "onnx", out, samples=16, log=lambda _: None)
    # the figure itself, not its printed digits (other CPUs round the last one differently)
    assert float(re.search(r"difference\| (\S+)", str(caught.value)).group(1)) > 0.1
    assert caught.value.exit_code == 1
    assert not (tmp_path / "parent").exists()


def test_parity_falls_back_to_synthetic_inputs_without_the_data(runs_root: Path, tmp_path: Path):
    ckpt = tiny_checkpoint("fashion_mnist_mlp_bn", runs_root)
    _, datamodule = load_for_inference(ckpt)
    datamodule.data_dir = str(tmp_path / "moved")  # the data and its decoded cache are gone
    datamodule.cache_dir = tmp_path / "no_cache"
    batches, source, real = ex.parity_batches(datamodule, 10)
    assert not real and "synthetic" in source and "not available" in source
    assert [tuple(b.shape) for b in batches] == [(1, 28, 28), (2, 28, 28), (7, 28, 28)]
    shutil.rmtree(tmp_path / "no_cache", ignore_errors=True)
