#!/usr/bin/env bash
# The device check: the gpu-marked tests, then `thdkit bench attention` with GPU settings (cuDNN,
# Pallas, blockwise parallel and serial, jax.nn's cuDNN without packing as the speed of light;
# bfloat16; T = 8k and 32k with 1, 16 and 256 documents), sized for under 8 minutes on one GPU.
#
#   scripts/device_check.sh [OUT_DIR] [--tiny]
#
# OUT_DIR (default ./device-check) receives device.txt (nvidia-smi), pytest.txt, attention.txt
# (the tables) and attention.json. --tiny: T = 256 with 4 documents, which also runs on a
# CPU (the GPU-only implementations are then reported "not supported"). Exits nonzero when a test
# fails or the benchmark does; the benchmark runs either way.
set -uo pipefail
out=./device-check
sizes=(--seq-len 8k,32k --segments 1,16,256 --repeats 10 --time-per-program 0.5)
for arg in "$@"; do
  case "$arg" in
    --tiny) sizes=(--seq-len 256 --segments 4 --heads 2 --repeats 2 --time-per-program 0.1) ;;
    -*) echo "device_check.sh: unknown option $arg (usage: [OUT_DIR] [--tiny])" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}

{ nvidia-smi || echo "no nvidia-smi"; } >"$out/device.txt" 2>&1
"$python" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest.txt"
tests=${PIPESTATUS[0]}
"$python" -m thdkit.cli bench attention "${sizes[@]}" --dtype bfloat16 \
  --implementation cudnn,pallas,blockwise,blockwise-serial,jax-nn-cudnn \
  --json "$out/attention.json" 2>&1 | tee "$out/attention.txt"
bench=${PIPESTATUS[0]}
echo "device check: pytest exit $tests, benchmark exit $bench; results in $out"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
