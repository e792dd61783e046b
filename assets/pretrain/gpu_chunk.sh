#!/usr/bin/env bash
# One pretraining chunk on the GPU machine (README.md, "Running it in chunks").
#
#   bash assets/pretrain/gpu_chunk.sh STAGE MINUTES [more arguments for the script]
#
# STAGE is sd-vae, sd-unet or llama. Resumes from the newest checkpoint of the stage found in
# .pretrain/STAGE/ (carried from this repository's ignored .pretrain/ folder) or in /tmp/pretrain
# (left by an earlier call on the same warm machine), trains for MINUTES, and puts what must come
# back under $OUT: the newest checkpoint as $OUT/STAGE-checkpoint-N/ (flat safetensors shards,
# each < 16 MiB), the log $OUT/STAGE.log, and, when the stage has finished, its final folder as
# one $OUT/NAME.tgz (sd-vae-final, mini-sd, mini-llama). Two stages may run side by side:
#   bash assets/pretrain/gpu_chunk.sh llama 8 & bash assets/pretrain/gpu_chunk.sh sd-vae 8; wait
set -euo pipefail
stage=${1:?stage: sd-vae, sd-unet or llama}
minutes=${2:?minutes of training in this chunk}
shift 2
out=${OUT:?OUT is unset: run this on the device machine}
# Packages the machine lacks (diffusers and its importlib_metadata), carried as wheels. Only those: every
# chunk of a stage must run on the same software, and the other wheels (20 MB) would not fit beside a
# UNet checkpoint in one call's 64 MiB.
wheels=$(ls .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>/dev/null || true)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-pretrain $wheels
  export PYTHONPATH=/tmp/site-pretrain
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
run=/tmp/pretrain
case $stage in
  sd-vae) script=(assets/pretrain/pretrain_sd.py --stage vae); dir=$run/sd/vae ;;
  sd-unet)  # the VAE: carried, else the one an earlier call on this machine finished
    vae=.pretrain/sd-vae-final; [ -d "$vae" ] || vae=$run/sd/vae/final
    script=(assets/pretrain/pretrain_sd.py --stage unet --vae_dir "$vae"); dir=$run/sd/unet ;;
  llama) script=(assets/pretrain/pretrain_llama.py); dir=$run/llama/llama ;;
  *) echo "unknown stage $stage: sd-vae, sd-unet or llama" >&2; exit 2 ;;
esac
# The newest checkpoint by step number, carried or local.
latest=$(ls -d .pretrain/"$stage"/checkpoint-* "$dir"/checkpoint-* 2>/dev/null \
         | awk -F'checkpoint-' '{print $NF" "$0}' | sort -n | tail -1 | cut -d' ' -f2- || true)
resume=()
if [ -n "$latest" ]; then resume=(--resume_from "$latest"); fi
base=$run/${stage%%-*}
set -o pipefail
export_dir=/tmp/export/$stage
rm -rf "$export_dir"
python3 "${script[@]}" --output_dir "$base" --max_minutes "$minutes" --keep_checkpoints 1 \
  --export_dir "$export_dir" "${resume[@]}" "$@" 2>&1 | tee "$out/$stage.log"
case $stage in
  sd-vae) final=$base/vae/final; name=sd-vae-final ;;
  sd-unet) final=$base/pipeline; name=mini-sd ;;
  llama) final=$base/model; name=mini-llama ;;
esac
if [ -d "$final" ]; then  # one file (the transfer takes at most 8); unpacks as NAME/
  tar czf "$out/$name.tgz" -C "$(dirname "$final")" --transform "s,^$(basename "$final"),$name," "$(basename "$final")"
else
  # $OUT/STAGE-checkpoint-N/ (only while the stage is unfinished: the transfer takes 8 files, 64 MiB):
  # named by stage, so two stages run side by side never collide, and one folder deep.
  for ck in "$export_dir"/checkpoint-*; do
    if [ -d "$ck" ]; then cp -r "$ck" "$out/$stage-$(basename "$ck")"; fi
  done
fi
ls -la "$out"
