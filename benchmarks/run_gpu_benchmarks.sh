#!/usr/bin/env bash
# The GPU benchmarks behind BENCHMARKS.md's "GPU targets", for ONE NVIDIA GPU (H100 SXM).
#
# Usage:  bash benchmarks/run_gpu_benchmarks.sh [OUT_DIR]      (default: benchmark_results/gpu)
# Needs:  clrjax installed with a CUDA jax (pip install -e . "jax[cuda12]"), and for the
#         PyTorch reference a CUDA torch + torchvision (pip install torch torchvision).
#         A step that fails is reported and the script goes on; the summary lists the JSON.
# Every JSON file records the device, library versions and the command line.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${1:-benchmark_results/gpu}
mkdir -p "$OUT"

# XLA GPU flags (see docs/PERFORMANCE.md for what each does and where it is documented).
# The latency-hiding scheduler matters once several GPUs exchange gradients; on one GPU it is harmless.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# newer JAX reads XLA_CLIENT_MEM_FRACTION (the old name is deprecated there): set both
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-$XLA_PYTHON_CLIENT_MEM_FRACTION}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}

failed=()
run() {  # run NAME CMD...: log to OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then failed+=("$name"); fi
  # pipefail: the exit status is the command's, not tee's
}

$PY -c "import jax; print(jax.devices()); assert jax.default_backend() == 'gpu', 'no GPU visible to jax'" \
  || { echo "JAX sees no GPU: install a CUDA jax first"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.csv"

# 1. clrjax ResNet-50 SimCLR, 224x224 crops (synthetic 256x256 images), bf16, batch 256:
#    step (img/s, FLOPs, MFU, memory) and input pipeline (host loader, host + on-device augmentation).
#    (a) plain SGD: the same optimizer as the PyTorch reference;  (b) the paper's LARS recipe.
run clrjax_resnet50_sgd $PY experiments/benchmark.py --config=configs/simclr.py:imagenet \
  --config.batch_size=256 --config.model.dtype=bfloat16 --config.optimizer.name=sgd \
  --mode=step,input --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/clrjax_resnet50_sgd.json"
run clrjax_resnet50_lars $PY experiments/benchmark.py --config=configs/simclr.py:imagenet \
  --config.batch_size=256 --config.model.dtype=bfloat16 \
  --mode=step --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/clrjax_resnet50_lars.json"
#    throughput against batch size
run clrjax_resnet50_sweep $PY experiments/benchmark.py --config=configs/simclr.py:imagenet \
  --config.model.dtype=bfloat16 --config.optimizer.name=sgd --sweep_batch=64,128,256,512 \
  --mode=step --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/clrjax_resnet50_sweep.json"

# 2. PyTorch reference of the same step (torchvision resnet50, 2048-2048-128 head with BN,
#    NT-Xent tau 0.1 over 2N anchors, SGD, bf16 autocast, channels_last, torch.compile).
run torch_resnet50 $PY benchmarks/torch_reference.py --arch=resnet50 --image_size=224 \
  --batch_size=256 --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/torch_resnet50.json"
run torch_resnet50_eager $PY benchmarks/torch_reference.py --arch=resnet50 --image_size=224 \
  --batch_size=256 --steps=$STEPS --warmup=$WARMUP --no_compile --json_out="$OUT/torch_resnet50_eager.json"

# 3. ViT-B/16 SimCLR MFU (224x224, bf16), with and without remat.
run clrjax_vitb16 $PY experiments/benchmark.py --config=configs/simclr.py:imagenet \
  --config.model.name=vit_base --config.model.dtype=bfloat16 --config.batch_size=256 \
  --mode=step --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/clrjax_vitb16.json"
run clrjax_vitb16_remat $PY experiments/benchmark.py --config=configs/simclr.py:imagenet \
  --config.model.name=vit_base --config.model.dtype=bfloat16 --config.model.remat=True \
  --config.batch_size=256 --mode=step --steps=$STEPS --warmup=$WARMUP --json_out="$OUT/clrjax_vitb16_remat.json"

# 4. Losses at large N and d: fwd+bwd time and compiled temporaries (float32 embeddings).
run clrjax_losses $PY experiments/benchmark.py --config=configs/simclr.py:imagenet --mode=loss \
  --loss_methods=simclr,barlow_twins,vicreg,tico --loss_batch=4096,16384 --loss_dims=128,2048,8192 \
  --loss_impl=replicated,column_split --steps=10 --warmup=2 --json_out="$OUT/clrjax_losses.json"

# Summary: clrjax / torch throughput ratio (target >= 1.3), ViT MFU (target >= 0.40),
# input/step ratio (target >= 1.5).
$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
jx, th = load("clrjax_resnet50_sgd.json"), load("torch_resnet50.json")
if jx and th:
    ratio = jx["step"][0]["images_per_s"] / th["images_per_s"]
    print(f"ResNet-50 SimCLR 224 bf16 B=256: clrjax {jx['step'][0]['images_per_s']:.0f} img/s, "
          f"torch {th['images_per_s']:.0f} img/s, ratio {ratio:.2f} (target >= 1.3)")
    if "input" in jx and "input_to_step_ratio" in jx["input"]:
        print(f"input/step ratio {jx['input']['input_to_step_ratio']:.2f} (target >= 1.5), "
              f"host alone {jx['input']['host_to_step_ratio']:.2f}")
for name in ("clrjax_vitb16.json", "clrjax_vitb16_remat.json"):
    v = load(name)
    if v and v["step"][0]["mfu"] is not None:
        print(f"{name}: MFU {100 * v['step'][0]['mfu']:.1f}% (target >= 40%), "
              f"{v['step'][0]['images_per_s']:.0f} img/s")
PYEOF

echo "results in $OUT"
if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
