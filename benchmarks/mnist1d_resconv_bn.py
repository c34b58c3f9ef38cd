"""MNIST-1D × residual-BN with conv blocks: test accuracy with and without batch norm over several seeds.

    python -m benchmarks.mnist1d_resconv_bn            # 3 seeds, BN on and off
    python -m benchmarks.mnist1d_resconv_bn --seeds 1 -- --trainer.max_epochs=20

Trains from configs/mnist1d_resconv_bn.yaml through the real CLI, tests the best checkpoint, and
prints test accuracy (mean ± std over seeds), the wall time and the CPU time of every run.
"""

from __future__ import annotations

from benchmarks.mnist1d_resnet_bn import bn_on_off


def main() -> None:
    bn_on_off(
        "configs/mnist1d_resconv_bn.yaml",
        "MNIST-1D residual-BN conv blocks",
        "lightning_logs/bench_mnist1d_resconv",
        __doc__,
    )


if __name__ == "__main__":
    main()
