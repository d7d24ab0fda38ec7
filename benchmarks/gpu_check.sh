#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one CUDA GPU, meant to fit in 10 minutes
# (not yet timed on a GPU).
#
#   bash benchmarks/gpu_check.sh --out FILE [--dry-run]
#
# Runs, writing all it prints to FILE (which must not exist yet) as well as the console:
#   1. the GPU tests (pytest -m gpu: bf16 + NCCL + ZeRO-3 training, the Python API on the GPU);
#   2. bf16 training with MFU at two model sizes (benchmarks/train_step.py --size small, base),
#      bare loop beside Ray Train + DeepSpeed;
#   3. ZeRO-3 beside that ZeRO-2 run on one GPU, at the base size;
#   4. serving on the GPU (benchmarks/serve_load.py --gpu).
# --dry-run: the same commands on CPU at the smallest size and a few steps, so that the test
# suite can run the script and it cannot rot; its figures mean nothing.
# A step that fails does not stop the later ones (a GPU machine is scarce); the script then
# names the failed steps and exits 1. The Python is $PYTHON, else the repository's .venv, else
# python3.
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh --out FILE [--dry-run]"
out="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?$usage}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
if [ -z "$out" ]; then
  echo "gpu_check: say where the figures go with --out FILE; $usage" >&2; exit 2
fi
if [ -e "$out" ]; then
  echo "gpu_check: $out exists and is kept; name a new file with --out" >&2; exit 2
fi
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

if [ "$dry_run" = 1 ]; then
  train=(--device cpu --steps 2 --pairs 1)
  sizes=(tiny tiny)
  serve=(--size small --requests 8 --seconds 1)
else
  if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; on a CPU machine run it with --dry-run" >&2; exit 2
  fi
  train=(--device cuda --steps 30 --pairs 1)
  sizes=(small base)
  serve=(--gpu --seconds 10)
fi

failed=()
step() {
  local title="$1"; shift
  printf '\n== %s\n$ %s\n' "$title" "$*" | tee -a "$out"
  "$@" 2>&1 | tee -a "$out" || failed+=("$title")
}

mkdir -p "$(dirname "$out")"
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ "$dry_run" = 1 ] && echo ', DRY RUN on CPU: figures mean nothing')"
  "$python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU')"
} | tee "$out"
step "GPU tests" "$python" -m pytest -q -m gpu -p no:cacheprovider tests
step "bf16 training and MFU, ${sizes[0]} model" "$python" benchmarks/train_step.py "${train[@]}" --size "${sizes[0]}"
step "bf16 training and MFU, ${sizes[1]} model, ZeRO-2" "$python" benchmarks/train_step.py "${train[@]}" --size "${sizes[1]}" --zero-stage 2
step "the same, ZeRO-3" "$python" benchmarks/train_step.py "${train[@]}" --size "${sizes[1]}" --zero-stage 3
step "serving" "$python" benchmarks/serve_load.py "${serve[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  printf '\ngpu_check: FAILED: %s; figures of the other steps in %s\n' "$(IFS=';'; echo "${failed[*]}")" "$out" | tee -a "$out"
  exit 1
fi
printf '\ngpu_check: done; figures in %s\n' "$out" | tee -a "$out"
