#!/usr/bin/env bash
# Offline demo (`make demo`): train plain LoRA, LoRA-Dash and AutoLoRA on the sample subject with
# the pretrained miniature `mini-sd` (assets/models/mini-sd, 64 px) for a few steps each, through
# `accelerate launch`, on CPU. It shows the whole path (data, training, checkpoints, export, stock
# reload, validation images, model card) on a model that draws its world; at these few steps the
# subject is not learned yet (README, "The pretrained miniature").
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
  --resolution 64 --train_batch_size 2 --learning_rate 1e-3 --seed 0
  --validation_prompt "a photo of sks toy on the beach" --num_validation_images 2 --num_inference_steps 20
  --checkpointing_steps 5 --output_kohya_format --overwrite_output_dir
)
launch() { "$PY" -m accelerate.commands.launch --config_file "$CONFIG" --cpu --num_processes 1 \
  train/dreambooth_dash.py "${common[@]}" "$@"; }

start=$(date +%s)
echo "== plain LoRA";  launch --method lora     --max_train_steps 60 --output_dir "$OUT/lora"
echo "== LoRA-Dash";   launch --method dash     --max_train_steps 60 --dash_warmup_steps 15 --output_dir "$OUT/dash"
echo "== AutoLoRA";    launch --method autolora --max_train_steps 8 --autolora_search_steps 4 --output_dir "$OUT/autolora"
echo
echo "Done in $(( $(date +%s) - start )) s. Outputs:"
for m in lora dash autolora; do
  echo "  $OUT/$m/  (pytorch_lora_weights.safetensors, dashdiff_adapter.safetensors, validation_*.png, README.md)"
done
echo "Open the app to try them:  $PY app.py"
