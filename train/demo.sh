#!/usr/bin/env bash
# Offline demo (`make demo`): DreamBooth on the sample subject (the toy cat) with the pretrained
# miniature `mini-sd` (assets/models/mini-sd, 64 px), through `accelerate launch`, on CPU: plain LoRA
# and LoRA-Dash side by side (one core each, 300 steps), then a short AutoLoRA run. It shows the whole
# path (data, training, checkpoints, export, stock reload, validation images, model card). The setting
# (rank 8 on the attention and feed-forward layers, text encoder, lr 1e-3, prior preservation; AutoLoRA
# searches the UNet only) was chosen on grids (BENCHMARKS.md, eighth and ninth rounds): the validation
# images draw the orange cat, with its ears, blue scarf and white belly, on the beach. The feed-forward
# layers matter because mini-sd's attention works at 8x8 and 4x4 latents only.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# The tiny model's matmuls are too small to gain from threads; on a busy machine extra threads
# only wait on each other (10x slower measured on 2 shared cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
OUT=outputs/demo
CONFIG=outputs/accelerate_cpu.yaml
mkdir -p "$OUT"

# A basic single-process CPU config, so the demo does not depend on the user's accelerate config.
"$PY" - "$CONFIG" <<'PYEOF'
import sys
from accelerate.utils import write_basic_config
write_basic_config(mixed_precision="no", save_location=sys.argv[1])
PYEOF

common=(
  --pretrained_model_name_or_path mini-sd
  --instance_data_dir assets/subject --instance_prompt "a photo of sks toy"
  --resolution 64 --train_batch_size 2 --rank 8 --learning_rate 1e-3 --seed 0
  --lora_layers to_k,to_q,to_v,to_out.0,ff.net.0.proj,ff.net.2
  --validation_prompt "a photo of sks toy on the beach" --num_validation_images 2 --num_inference_steps 20
  --checkpointing_steps 100 --output_kohya_format --overwrite_output_dir
)
# Prior preservation (DreamBooth's class images of "a photo of a toy", drawn by mini-sd itself) keeps the
# contexts the world knows; one class folder per run, as the two train at the same time.
prior=(--with_prior_preservation --class_prompt "a photo of a toy" --num_class_images 20)
# DreamBooth reuses class images it finds; ones drawn by an earlier mini-sd would train another prior.
rm -rf "$OUT/class_lora" "$OUT/class_dash"
launch() { "$PY" -m accelerate.commands.launch --config_file "$CONFIG" --cpu --num_processes 1 \
  train/dreambooth_dash.py "${common[@]}" "$@"; }

start=$(date +%s)
echo "== plain LoRA and LoRA-Dash, side by side (logs: $OUT/lora.log, $OUT/dash.log)"
launch --method lora --train_text_encoder "${prior[@]}" --class_data_dir "$OUT/class_lora" --max_train_steps 300 --output_dir "$OUT/lora" > "$OUT/lora.log" 2>&1 & lora=$!
launch --method dash --train_text_encoder "${prior[@]}" --class_data_dir "$OUT/class_dash" --max_train_steps 300 --dash_warmup_steps 50 --output_dir "$OUT/dash" > "$OUT/dash.log" 2>&1 & dash=$!
status=0
wait $lora || { status=$?; echo "plain LoRA failed (exit $status); see $OUT/lora.log" >&2; }
wait $dash || { status=$?; echo "LoRA-Dash failed (exit $status); see $OUT/dash.log" >&2; }
[ $status -eq 0 ] || exit $status
echo "== AutoLoRA";    launch --method autolora --max_train_steps 8 --autolora_search_steps 4 --output_dir "$OUT/autolora"
echo
echo "Done in $(( $(date +%s) - start )) s. Outputs:"
for m in lora dash autolora; do
  echo "  $OUT/$m/  (pytorch_lora_weights.safetensors, dashdiff_adapter.safetensors, validation_*.png, README.md)"
done
echo "Open the app to try them:  $PY app.py"
