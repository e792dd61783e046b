#!/usr/bin/env bash
# GPU smoke run of both training scripts on tiny random-weight models in bf16 through accelerate launch
# (AutoLoRA with batched finite differences and prior preservation; LoRA-Dash through its launch).
# Usage on a GPU machine: bash bench/gpu_smoke.sh
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import accelerate, diffusers, peft, transformers, torch; print('accelerate', accelerate.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" || exit 3
L="python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision bf16"
P=$(python3 -c "from dashdiff.testing import resolve_model; print(resolve_model('tiny-llama', cache_dir='/tmp/cache'))" 2>/dev/null | tail -1)
COMMON="--val_set_size 2 --batch_size 4 --micro_batch_size 2 --num_epochs 2 --lora_r 4 --lora_alpha 8 --learning_rate 1e-2 --warmup_steps 2 --eval_step 4 --save_step 100 --logging_steps 100"
# each method's own options only: another method's are refused (train/input_rules.py)
declare -A OWN=([autolora]="--autolora_beta_lr 0.05" [dash]="--dash_warmup_steps 3")
for kind in autolora dash; do
  $L train/commonsense_dash.py --base_model "$P" --data_path tests/fixtures/commonsense/train.json --output_dir /tmp/cs_$kind --adapter_name $kind $COMMON ${OWN[$kind]} 2>&1 | grep -E "AutoLoRA search|launched|Error|error|status" | tail -4
  python3 -c "import json; r=json.load(open('/tmp/cs_$kind/dashdiff_run.json')); print('commonsense $kind:', r['status'], r.get('results', {}).get('autolora_ranks', '')and 'ranks found')"
done
DB="--pretrained_model_name_or_path tiny-sd --instance_data_dir assets/subject --instance_prompt sks --resolution 64 --train_batch_size 2 --report_to none --learning_rate 1e-3"
$L train/dreambooth_dash.py $DB --method autolora --autolora_search_steps 3 --max_train_steps 3 --with_prior_preservation --class_prompt toy --num_class_images 2 --class_data_dir /tmp/class --output_dir /tmp/db_auto 2>&1 | grep -E "Error|error" | tail -3
$L train/dreambooth_dash.py $DB --method dash --dash_warmup_steps 2 --max_train_steps 4 --output_dir /tmp/db_dash 2>&1 | grep -E "launched|Error|error" | tail -3
for d in db_auto db_dash; do python3 -c "import json; r=json.load(open('/tmp/$d/dashdiff_run.json')); print('$d', r['status'], r.get('mixed_precision') or r['args'].get('mixed_precision'), r.get('autolora_ranks') and 'ranks found', r.get('dash_launch'))"; done
