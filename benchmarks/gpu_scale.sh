#!/usr/bin/env bash
# Issue 11's GPU measurements in one script, for a lent H100/H200 (about 8 minutes): the training pipeline against
# its ceiling and the ImageFolder baseline (ResNet-50, 224 px), Grad-CAM throughput against pytorch-grad-cam and a
# no-grad forward, and a DDP run on every GPU of the machine (torchrun; 1 GPU: 1 process). Results land in
# benchmarks/results/*_cuda*.json and $OUT when set. Copy chest_xray_kermany_224 and medmnist/ into an ignored folder,
# carry it, and point MEDXAI_DATA_DIR at it. Not yet run: no device was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MEDXAI_DATA_DIR=${MEDXAI_DATA_DIR:-data} MEDXAI_CACHE_DIR=${MEDXAI_CACHE_DIR:-/tmp/medxai-cache}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
step() { timeout "$1" "${@:2}" || echo "step failed or timed out: ${*:2}"; }
step 240 "$PY" benchmarks/train_throughput.py --device cuda --models resnet50 --sizes 224 --channels 3 --batch 128 \
    --images 5216 --out benchmarks/results/train_throughput_cuda_resnet50.json
step 120 "$PY" benchmarks/explain_throughput.py --device cuda --model resnet50 --batch 64
step 180 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m medxai train --preset demo \
    --device cuda --out /tmp/gpu-runs --name "ddp$GPUS" --overwrite
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null || true; fi
