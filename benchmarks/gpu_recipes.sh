#!/usr/bin/env bash
# The GPU accuracy recipes of benchmarks/accuracy.py in one script, for a lent H100/H200 (15 minutes in all):
# Kermany from scratch with ResNet-18 / ResNet-50 / DenseNet-121 at 224 px (the kermany preset, 3 seeds each where
# time allows) and PneumoniaMNIST's seed ensemble. Each writes benchmarks/results/accuracy_<dataset>_<tag>.json.
# Copy chest_xray_kermany_224 and medmnist/ into an ignored folder, carry it, and point MEDXAI_DATA_DIR at it.
# Not yet run on a GPU: no device was lent to the session that wrote it (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MEDXAI_DATA_DIR=${MEDXAI_DATA_DIR:-data}
run() { timeout "$1" "$PY" benchmarks/accuracy.py --device cuda "${@:2}" || echo "recipe failed or timed out: ${*:2}"; }
run 150 --dataset pneumoniamnist --tag gpu
run 240 --dataset kermany --seeds 3 --tag gpu_resnet18_224
run 180 --dataset kermany --seeds 1 --set model.name=resnet50 --tag gpu_resnet50_224
run 180 --dataset kermany --seeds 1 --set model.name=densenet121 --tag gpu_densenet121_224
