#!/bin/sh
# Bonfire's GPU check: NCCL, DDP through NCCL, DP and the host ring on one
# GPU, each against one CPU worker from the same weights, DDP throughput, and
# PyTorch on the same GPU for a ratio. Every training step asserts what it
# shows (a difference within tolerance, an accuracy above a floor).
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# NCCL (nvidia-nccl-cu13) and NVRTC come with PyTorch's wheels: put every
# nvidia/*/lib folder of its site-packages on the library path.
NV_LIBS=$($PY -c 'import nvidia, os; b = list(nvidia.__path__)[0]; print(":".join(os.path.join(b, d, "lib") for d in sorted(os.listdir(b)) if os.path.isdir(os.path.join(b, d, "lib"))))' 2>/dev/null)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH="$NV_LIBS:${LD_LIBRARY_PATH:-}"
failed=0
step() { echo; echo "== $1"; shift; "$@" || { echo "!! failed: exit $?"; failed=1; }; }
COMMON="--dataset fashion-mnist --data-dir data --model lenet --batch-size 100 --no-shuffle --seed 7"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# A launched worker joins the others (NCCL by default on CUDA), even alone.
NCCL_DDP="./bonfire launch --nproc-per-node 1 -- ./bonfire train --backend cuda --strategy ddp --workers 1"
# `accuracy_at_least OUT MIN`: the test accuracy of the run in OUT reached MIN.
accuracy_at_least() {
  awk -F, -v min="$2" 'NR > 1 && $4 != "" { acc = $4 } END { printf "test accuracy %s (at least %s)\n", acc, min; exit !(acc >= min) }' "$1/metrics.csv"
}
# `learns NAME ARGS...`: 200 steps of `bonfire train ARGS` reach a test
# accuracy of 0.6 (one CPU worker reaches 0.74 on the check's data, 2 DDP workers 0.73).
learns() {
  name=$1; shift
  "$@" $COMMON --epochs 3 --steps 200 --out "runs/$name" && accuracy_at_least "runs/$name" 0.6
}
# `like_cpu NAME ARGS...`: 20 steps of `bonfire train ARGS` from the shared
# weights equal 20 steps of one CPU worker on the whole batch.
like_cpu() {
  name=$1; shift
  "$@" $COMMON --steps 20 --init runs/init.safetensors --save "runs/$name.safetensors" --out "runs/$name" &&
    ./bonfire diff-weights "runs/$name.safetensors" runs/cpu.safetensors --tolerance 1e-3
}

step "device" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# At world 1 NCCL's reduction is a copy: this checks the calls and the memory handling, not a sum across ranks.
step "NCCL all-reduce, world 1: calls, memory handling, bandwidth" ./bonfire nccl-check --sizes-mib 1,16,64,256
step "one CPU worker, 20 steps from shared weights (the reference)" sh -c '
  ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 1 --lr 0 --save runs/init.safetensors --out runs/init &&
  ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 20 --init runs/init.safetensors --save runs/cpu.safetensors --out runs/cpu'
step "DDP through NCCL (world 1) against the CPU" like_cpu nccl $NCCL_DDP
step "DP, 2 replicas on the one GPU, against the CPU" like_cpu dp ./bonfire train --backend cuda --strategy dp --workers 2
step "host ring, 2 workers sharing the GPU, against the CPU" \
  like_cpu ring ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring
step "host ring, 2 workers sharing the GPU, learns in 200 steps" \
  learns ring-learns ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring
step "DDP through NCCL, 200 steps of LeNet (images/s on the epoch line), learns" learns ddp $NCCL_DDP
echo "steady images/s (steps 6..200, wall clock):"
awk -F, 'NR == 6 { start = $4 } NR > 6 { n++; end = $4 } END { if (end > start) printf "%.0f\n", n * 100 / (end - start) }' runs/ddp/steps.csv
if [ "$GPUS" -ge 2 ]; then
  step "DDP through NCCL over 2 GPUs, against the CPU" like_cpu ddp2 ./bonfire train --backend cuda --strategy ddp --workers 2
fi
step "PyTorch on the same GPU, 200 steps" $PY torch_ddp_train.py --world 1 --device cuda --steps 200 --batch 100 --data-dir data
exit $failed
