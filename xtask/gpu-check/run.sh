#!/bin/sh
# Bonfire's GPU check: NCCL, DDP through NCCL, DP and the host ring on one
# GPU, each against one CPU worker from the same weights; then a speed table
# for LeNet (batch 100) and the ResNet (batch 256): one GPU alone, DDP through
# NCCL at world 1, DP with 2 replicas and the host ring with 2 workers on the
# one GPU, beside PyTorch (and Burn's own DDP, where its program is in the
# folder) on the same GPU in the same run. Every training step asserts what
# it shows (a difference within tolerance, a run that learned).
#
# `./run.sh check` runs the equivalence steps, `./run.sh speed` the speed
# table, `./run.sh` both. Each step has a time limit, so that one that hangs
# or compiles too long costs its limit, not the check.
cd "$(dirname "$0")"
part=${1:-all}
case $part in check|speed|all) ;; *) echo "usage: ./run.sh [check|speed|all]"; exit 2;; esac
# cubecl.toml (in this folder) keeps compiled kernels and autotune results
# here, so that each program after the first neither compiles nor tunes again.
# The programs come gzipped, so that the folder fits what a check may carry.
for program in bonfire burn-ddp; do
  if [ -f $program.gz ]; then gzip -dc $program.gz > $program && chmod +x $program || exit 1; fi
done
PY=${PYTHON:-python3}
# NCCL (nvidia-nccl-cu13) and NVRTC come with PyTorch's wheels: put every
# nvidia/*/lib folder of its site-packages on the library path.
NV_LIBS=$($PY -c 'import nvidia, os; b = list(nvidia.__path__)[0]; print(":".join(os.path.join(b, d, "lib") for d in sorted(os.listdir(b)) if os.path.isdir(os.path.join(b, d, "lib"))))' 2>/dev/null)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH="$NV_LIBS:${LD_LIBRARY_PATH:-}"
failed=0
mkdir -p runs/speed
# cubecl.toml logs each kernel CubeCL compiles and each set of shapes it
# tunes to these files: a step's count of both says what its time went to.
kernels() { cat runs/cubecl-compilation.log 2>/dev/null | grep -c 'Compiling kernel'; }
tunes() { cat runs/cubecl-autotune.log 2>/dev/null | grep -c 'Fastest result'; }
# `step NAME COMMAND...`: runs COMMAND, each program in it for at most
# STEP_LIMIT seconds (a shell function here limits its own programs).
STEP_LIMIT=${STEP_LIMIT:-240}
step() {
  echo; echo "== $1"; shift
  start=$(date +%s) kernels_before=$(kernels) tunes_before=$(tunes)
  case $(type "$1" 2>/dev/null) in
    *function*) "$@" ;;
    *) timeout "$STEP_LIMIT" "$@" ;;
  esac
  code=$?
  echo "   ($(( $(date +%s) - start )) s; kernels compiled: $(( $(kernels) - kernels_before )), shapes tuned: $(( $(tunes) - tunes_before )))"
  [ $code = 0 ] || { echo "!! failed: exit $code$([ $code = 124 ] && echo ", over $STEP_LIMIT s")"; failed=1; }
}
COMMON="--dataset fashion-mnist --data-dir data --model lenet --batch-size 100 --no-shuffle --seed 7"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# A launched worker joins the others (NCCL by default on CUDA), even alone.
NCCL_DDP="./bonfire launch --nproc-per-node 1 -- ./bonfire train --backend cuda --strategy ddp --workers 1"
# `like_cpu NAME ARGS...`: 20 steps of `bonfire train ARGS` from the shared
# weights equal 20 steps of one CPU worker on the whole batch, and (for the
# parallel paths) 20 steps of one GPU worker, whose arithmetic they share:
# the second comparison isolates Bonfire's collectives from the backend's
# kernels (cubek's matmuls stage f32 as TF32 on tensor cores).
like_cpu() {
  name=$1; shift
  timeout "$STEP_LIMIT" "$@" $COMMON --steps 20 --init runs/init.safetensors --save "runs/$name.safetensors" \
    --out "runs/$name" || return
  status=0
  if [ "$name" != gpu ] && [ -f runs/gpu.safetensors ]; then
    echo "against one GPU worker:"
    ./bonfire diff-weights "runs/$name.safetensors" runs/gpu.safetensors --tolerance 1e-3 || status=1
    echo "against one CPU worker:"
  fi
  ./bonfire diff-weights "runs/$name.safetensors" runs/cpu.safetensors --tolerance 1e-3 || status=1
  return $status
}

step "device" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
if [ $part != speed ]; then
  # At world 1 NCCL's reduction is a copy: this checks the calls and the memory handling, not a sum across ranks.
  step "NCCL all-reduce, world 1: calls, memory handling, bandwidth" ./bonfire nccl-check --sizes-mib 1,16,64,256
  step "one CPU worker, 20 steps from shared weights (the reference)" sh -c '
    ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 1 --lr 0 --save runs/init.safetensors --out runs/init &&
    ./bonfire train --backend cpu --strategy single '"$COMMON"' --steps 20 --init runs/init.safetensors --save runs/cpu.safetensors --out runs/cpu'
  step "one GPU worker against the CPU (the backend's own arithmetic)" like_cpu gpu ./bonfire train --backend cuda --strategy single
  step "DDP through NCCL (world 1) against the CPU" like_cpu nccl $NCCL_DDP
  step "DP, 2 replicas on the one GPU, against the CPU" like_cpu dp ./bonfire train --backend cuda --strategy dp --workers 2
  step "host ring, 2 workers sharing the GPU, against the CPU" \
    like_cpu ring ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring
  if [ "$GPUS" -ge 2 ]; then
    step "DDP through NCCL over 2 GPUs, against the CPU" like_cpu ddp2 ./bonfire train --backend cuda --strategy ddp --workers 2
  fi
fi
[ $part = check ] && exit $failed

# Speed. `speed MODEL BATCH STEPS ROW COMMAND...`: a Bonfire run that the
# table reads from runs/speed/MODEL-ROW (images/s after the warm-up, loss,
# test accuracy).
speed() {
  model=$1 batch=$2 steps=$3 row=$4; shift 4
  step "$model, $row" "$@" --dataset fashion-mnist --data-dir data --model "$model" --batch-size "$batch" \
    --seed 7 --epochs 100 --steps "$steps" --out "runs/speed/$model-$row"
}
# MODELS picks the models (both by default), so that a short lease can
# measure them in separate calls.
for model in ${MODELS:-lenet resnet}; do
  case $model in
    lenet) batch=100 steps=300 epoch=80 ;;
    resnet) batch=256 steps=60 epoch=32 ;;
    *) echo "unknown model $model (lenet, resnet)"; exit 2 ;;
  esac
  # The anchor first: it needs no kernel compiled or tuned.
  step "$model, PyTorch" sh -c "$PY torch_ddp_train.py --world 1 --device cuda --model $model --batch $batch \
    --steps $steps --data-dir data --json > runs/speed/$model-torch.json"
  # Untimed: CubeCL compiles and tunes the model's kernels for the batch of
  # one GPU and for the half batch of DP's replicas and the ring's workers,
  # past the first evaluation, so that no timed row pays those first-time costs.
  # From a cold folder that takes minutes (WARM_LIMIT each, 600 s by default).
  limit=$STEP_LIMIT STEP_LIMIT=${WARM_LIMIT:-600}
  speed "$model" "$batch" $((epoch + 5)) warm-whole ./bonfire train --backend cuda --strategy single
  speed "$model" "$batch" $((epoch + 5)) warm-half ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring
  STEP_LIMIT=$limit
  speed "$model" "$batch" "$steps" alone ./bonfire train --backend cuda --strategy single
  speed "$model" "$batch" "$steps" ddp-nccl-1 $NCCL_DDP
  speed "$model" "$batch" "$steps" dp-2 ./bonfire train --backend cuda --strategy dp --workers 2
  speed "$model" "$batch" "$steps" ring-2 ./bonfire train --backend cuda --strategy ddp --workers 2 --comm ring
  if [ -x ./burn-ddp ]; then
    step "$model, Burn's own DDP (world 1)" sh -c "./burn-ddp --model $model --batch $batch --steps $steps \
      --data-dir data > runs/speed/$model-burn-ddp.json"
  fi
done
step "speed table (each row's images/s over its steps after the warm-up)" $PY table.py runs/speed

# Where a step's time goes, Bonfire and PyTorch side by side, where the
# machine has Nsight Systems.
if command -v nsys >/dev/null; then
  for who in bonfire torch; do
    if [ $who = bonfire ]; then
      cmd="./bonfire train --backend cuda --strategy single --model lenet --batch-size 100 --steps 100 --dataset fashion-mnist --data-dir data --out runs/prof"
    else
      cmd="$PY torch_ddp_train.py --world 1 --device cuda --model lenet --batch 100 --steps 100 --data-dir data"
    fi
    step "profile: $who, LeNet, 100 steps" sh -c "nsys profile --force-overwrite true -o runs/prof-$who $cmd >/dev/null &&
      nsys stats --report cuda_api_sum,cuda_gpu_kern_sum --format csv runs/prof-$who.nsys-rep | head -40"
  done
else
  echo; echo "== profile: nsys is not on this machine; the table's rows are the measurement"
fi
exit $failed
