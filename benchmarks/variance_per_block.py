"""Activation variance after each residual block at initialisation, with and without batch norm
on a batch of real MNIST-1D signals.

    python -m benchmarks.variance_per_block            # writes docs/variance_per_block.png

He-initialised residual-BN networks (``ResidualBN``'s network: 5 linear blocks of width 100, and
the conv-block variant) get one batch of 200 training signals in train mode; ActivationStats's measurement
(per-feature variance over the batch, averaged over features) is taken after the stem and after
every block, averaged over several initialisation seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.runner import build_data
from src.callbacks.activation_stats import collect_activation_stats
from src.models import ResidualBN

SETTINGS = {
    "no BN": {"batch_norm": False},
    "BN before ReLU": {"batch_norm": True, "bn_position": "before_activation"},
    "BN after ReLU": {"batch_norm": True, "bn_position": "after_activation"},
}


def block_variances(x: torch.Tensor, seeds: int, **net_args) -> list[float]:
    """Variance after the stem and after each block, mean over ``seeds`` initialisations."""
    per_seed = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = ResidualBN(num_classes=10, input_size=x.shape[1], **net_args).net  # the model's network
        stats = collect_activation_stats(net, x)
        num_blocks = len(net.blocks)
        # The stem is not a tracked layer: measure it on its own.
        with torch.no_grad():
            stem = net.stem(x)
        stem_var = stem.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).mean().item()
        per_seed.append([stem_var, *(stats[f"blocks.{i}"][1] for i in range(num_blocks))])
    return [statistics.mean(col) for col in zip(*per_seed, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="initialisation seeds averaged")
    parser.add_argument("--output", type=Path, default=Path("docs/variance_per_block.png"))
    parser.add_argument("--cache_dir", default="data_cache/mnist1d")
    args = parser.parse_args()

    # The MNIST-1D pair's data as its config builds it.
    data = build_data("configs/mnist1d_resnet_bn.yaml", [f"--data.init_args.cache_dir={args.cache_dir}"])
    data.prepare_data()
    x = data.load_splits()["train"][0][:200]
    print(
        f"input variance {x.var(dim=0, unbiased=False).mean():.3f} (batch of {len(x)} MNIST-1D training signals)"
    )

    curves = {}
    for block, extra in (
        ("linear", {"hidden_size": 100, "num_blocks": 5}),
        ("conv", {"hidden_size": 64, "num_blocks": 5}),
    ):
        for name, bn in SETTINGS.items():
            curves[(block, name)] = block_variances(x, args.seeds, block=block, **extra, **bn)

    print(f"\nVariance after the stem (0) and each residual block, mean of {args.seeds} He initialisations")
    print(
        "| blocks | setting | "
        + " | ".join(str(i) for i in range(6))
        + " | growth per block, 1 → 5 (geometric mean) |"
    )
    print("|---|---|" + "---|" * 7)
    for (block, name), v in curves.items():
        growth = (v[-1] / v[1]) ** (1 / (len(v) - 2))
        print(f"| {block} | {name} | " + " | ".join(f"{a:.2f}" for a in v) + f" | ×{growth:.2f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, block in zip(axes, ("linear", "conv"), strict=True):
        for name in SETTINGS:
            v = curves[(block, name)]
            ax.plot(range(len(v)), v, marker="o", label=name)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("residual block (0 = stem output)")
        ax.set_title(f"{block} blocks (MNIST-1D, He init)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("activation variance")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
