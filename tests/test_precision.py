"""Mixed precision on every model: ``--trainer.precision=bf16-mixed`` trains on CPU with batch norm
kept in float32 (its weights and running statistics; autocast feeds it bfloat16 activations)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers.cli import CONFIGS, ROOT, build, data_class, run_cli
from tests.helpers.data import TINY_DATA, quiet

pytestmark = pytest.mark.slow  # every test trains a model

QUICK = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--test_after_fit=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def build_quick(config: Path, tmp_path: Path, *extra: str):
    data = TINY_DATA[data_class(config)](tmp_path)
    logs = f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"
    return build("--config", str(config), *QUICK, *data, logs, *extra)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_bf16_mixed_fits_with_batch_norm_in_float32(config: Path, tmp_path: Path):
    cli = build_quick(config, tmp_path, "--trainer.precision=bf16-mixed")
    bns = [m for m in cli.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns, "the config's model has no batch norm"
    seen: set[torch.dtype] = set()
    hooks = [bn.register_forward_hook(lambda m, i, o: seen.add(i[0].dtype)) for bn in bns]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in seen  # autocast was on: BN received bf16 activations
    for bn in bns:
        assert bn.weight.dtype == bn.running_var.dtype == torch.float32
        assert bn.num_batches_tracked > 0 and torch.isfinite(bn.running_var).all()
    assert torch.isfinite(cli.trainer.callback_metrics["val_loss"])
    state = torch.load(next((tmp_path / "logs").rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith("running_var"))


@pytest.mark.slow
def test_a_bf16_mixed_fit_prints_no_warning_about_the_model_summary(tmp_path: Path):
    config = ROOT / "configs" / "fashion_mnist_mlp_bn.yaml"  # trains in bf16-mixed as shipped
    data = TINY_DATA[data_class(config)](tmp_path)
    out = run_cli("fit", "--config", str(config), *data, *quiet(tmp_path), cwd=tmp_path)
    assert "bfloat16" in out.stderr and "Traceback" not in out.stderr
    said = out.stdout + out.stderr
    assert "model summary" not in said and "Total estimated model params size" in said, said[-3000:]


def test_fp16_mixed_on_cpu_falls_back_to_bf16(tmp_path: Path):
    with pytest.warns(UserWarning, match="not supported on CPU"):
        cli = build_quick(Path(CONFIGS[0]), tmp_path, "--trainer.precision=16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
