#!/usr/bin/env bash
# Runs the real-size benchmarks on a GPU machine and appends their tables to BENCHMARKS.md-gpu.
# Usage: bash bench/gpu_suite.sh SECTION...   (sections: step-sdxl step-sdxl-fused step-llama step-llama-fused
#        launch-sdxl launch-llama overlap-sdxl overlap-sdxl-cuda infer-sdxl autolora)
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUTFILE=${OUT:-.}/gpu_tables.md
run() { echo "+ $*"; python3 "$@" | tee -a "$OUTFILE"; }
for section in "$@"; do
  case $section in
    step-sdxl)   run bench/step_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 --steps 30 --warmup 10 --methods lora_r,dash,lora_r+s ;;
    step-sdxl-fused) run bench/step_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 --steps 30 --warmup 10 --methods lora_r,dash,lora_r+s --optimizer fused ;;
    step-llama)  run bench/step_time.py --model llama7b --device cuda --dtype bfloat16 --rank 32 --steps 30 --warmup 10 --methods lora_r,dash,lora_r+s ;;
    step-llama-fused) run bench/step_time.py --model llama7b --device cuda --dtype bfloat16 --rank 32 --steps 30 --warmup 10 --methods lora_r,dash,lora_r+s --optimizer fused ;;
    launch-sdxl) run bench/launch_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 ;;
    launch-llama) run bench/launch_time.py --model llama7b --device cuda --dtype bfloat16 --rank 32 --sections launch,overlap ;;
    overlap-sdxl) run bench/launch_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 --sections launch,overlap ;;
    overlap-sdxl-cuda) run bench/launch_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 --sections overlap --prefetch_device cuda ;;
    infer-sdxl)  run bench/infer_time.py --model sdxl --device cuda --dtype bfloat16 --rank 4 ;;
    autolora)    run bench/autolora_cost.py --device cuda --model sdxl --bf16 --batch 1 --latent 128 --rounds 12 --warmup 2 --threads 8 || run bench/autolora_cost.py --device cuda --model sdxl --bf16 --batch 1 --latent 64 --rounds 8 --warmup 2 --threads 8 ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
