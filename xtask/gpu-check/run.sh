#!/bin/sh
# Bonfire's GPU check: NCCL, DDP through NCCL, the host ring on one GPU, DDP
# throughput, CPU equivalence, and PyTorch on the same GPU for a ratio.
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

step "device" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step "NCCL all-reduce, world 1: correctness and bandwidth" ./bonfire nccl-check --sizes-mib 1,16,64,256
step "host ring, 2 workers sharing the GPU (50 steps)" \
  ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring $COMMON --steps 50 --out runs/ring
step "DDP through NCCL, 200 steps of LeNet (images/s on the epoch line)" \
  $NCCL_DDP $COMMON --epochs 3 --steps 200 --out runs/ddp
echo "steady images/s (steps 6..200):"
awk -F, 'NR>6 { s += $3; n++ } END { if (s > 0) printf "%.0f\n", n * 100 / s }' runs/ddp/steps.csv
if [ "$GPUS" -ge 2 ]; then
  step "DDP through NCCL over 2 GPUs (50 steps)" \
    ./bonfire train --backend cuda --strategy ddp --workers 2 $COMMON --steps 50 --out runs/ddp2
fi
step "DDP through NCCL on CUDA against the CPU: 20 steps each from the same weights" sh -c '
  ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 1 --lr 0 --save runs/init.safetensors --out runs/init &&
  '"$NCCL_DDP"' '"$COMMON"' --steps 20 --init runs/init.safetensors --save runs/cuda.safetensors --out runs/eq-cuda &&
  ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 20 --init runs/init.safetensors --save runs/cpu.safetensors --out runs/eq-cpu &&
  ./bonfire diff-weights runs/cuda.safetensors runs/cpu.safetensors --tolerance 1e-3'
step "PyTorch on the same GPU, 200 steps" $PY torch_ddp_train.py --world 1 --device cuda --steps 200 --batch 100 --data-dir data
exit $failed
