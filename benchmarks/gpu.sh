#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, in one run on a machine with NVIDIA GPUs:
# training throughput against open_clip_train (ViT-B-32, bf16) on one GPU and, with several,
# on every GPU through the torchrun launcher; then the retrieval evaluation's speed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # figures and logs under OUT_DIR (default: $OUT or ./gpu-results)
#
# It uses the active Python when clipforge imports there; otherwise it makes .gpu-venv beside the
# repository (with the system's site packages, so a preinstalled CUDA torch is kept) and installs
# the package into it: from the wheels in .whl/ when that folder exists (a machine without
# internet: fill it where there is, with `pip download -d .whl -r <(pip freeze --exclude-editable)`
# for that machine's Python and platform), else from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python -c "import clipforge, open_clip_train" 2>/dev/null; then
  python -m venv --system-site-packages .gpu-venv
  . .gpu-venv/bin/activate
  if [ -d .whl ]; then
    pip install -q --no-index --find-links .whl -e ".[test]"
  else
    pip install -q -e ".[test]"
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
gpus=$(nvidia-smi -L | wc -l)
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$out/versions.txt"
uptime | tee -a "$out/versions.txt"

common=(--model ViT-B-32 --precision bf16 --device cuda --image-size 224 --batch-size 256 --samples 5120)
python benchmarks/train_throughput.py "${common[@]}" --workers 8 2>&1 | tee "$out/train_1gpu.txt"
if [ "$gpus" -gt 1 ]; then
  python benchmarks/train_throughput.py "${common[@]}" --workers 4 --nproc "$gpus" 2>&1 | tee "$out/train_${gpus}gpu.txt"
fi
python benchmarks/adapters.py --model ViT-B-32 --device cuda --image-size 224 --size 4000 --batch-size 128 \
  2>&1 | tee "$out/adapters.txt"
python benchmarks/retrieval.py --images 20000 --captions-per-image 5 --dim 512 2>&1 | tee "$out/retrieval.txt"
echo "figures in $out"
