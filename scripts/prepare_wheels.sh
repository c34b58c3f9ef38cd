#!/usr/bin/env bash
# Prepare what the device check carries to the GPU machine (docs/gpu.md), on a machine with the
# package index:
#   .whl/      the wheels the GPU image lacks (Python 3.12, x86-64), installed there without network;
#   .devdata/  the data: the Fashion-MNIST and AG News parquet copies and the MNIST-1D cache.
# Both folders are git-ignored and travel with `carry: [".whl", ".devdata"]` (together ~42 MB of the
# 64 MiB a call may carry).
#
#   bash scripts/prepare_wheels.sh [DATA_DIR]       # DATA_DIR: default ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${BN_DATA_DIR:-../shared/data}}
PY=${PYTHON:-python3}

# The image has torch, lightning, torchmetrics, tensorboard, pyarrow, pandas, numpy, scipy, matplotlib,
# requests, huggingface-hub, fsspec, xxhash, pyyaml and typing-extensions (KINDS.md of the device
# tool); these are the rest, at the versions the project is tested with (constraints.txt).
WHEELS=(
    jsonargparse      # LightningCLI
    docstring-parser  # jsonargparse[signatures]: help texts from docstrings
    typeshed-client   # jsonargparse[signatures]: stub-resolved signatures
    datasets          # reading the parquet copies (Fashion-MNIST, AG News)
    dill              # datasets
    multiprocess      # datasets
    mnist1d           # generating MNIST-1D when the carried cache does not match
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -c constraints.txt -d .whl "${WHEELS[@]}"
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"

mkdir -p .devdata/fashion_mnist .devdata/ag_news
cp "$DATA"/fashion_mnist/{train,test}.parquet .devdata/fashion_mnist/
cp "$DATA"/ag_news/{train_first_10429_rows,test}.parquet .devdata/ag_news/
chmod -R u+w .devdata
# The MNIST-1D cache of the configs' settings (its file name is a hash of them, so it is found there).
"$PY" -c "from src.data import MNIST1D; MNIST1D(cache_dir='.devdata/mnist1d').prepare_data()"
echo "data: $(du -sh .devdata | cut -f1) in .devdata"
echo "carry total: $(du -shc .whl .devdata | tail -1 | cut -f1) (limit 64 MiB with the working tree)"
