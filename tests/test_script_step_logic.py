"""The training scripts' optimizer-step boundaries with gradient accumulation (issue 16): which micro-batches make
up each optimizer step, in process. The scripts' end-to-end files run accumulation only through accelerate
launch (slow, and they check the outputs, not the step boundaries); a boundary one micro-batch early or late
passed every in-process test (planted, BENCHMARKS.md "Mutation testing").

Expected boundaries are worked out by hand from the documented rules: DreamBooth steps after
``gradient_accumulation_steps`` micro-batches or at the end of an epoch (as accelerate syncs at the end of the data
loader); the commonsense script's step ``s`` takes the next ``batch_size // micro_batch_size`` micro-batches of its
epoch's order, the last step of an epoch possibly fewer.
"""

from __future__ import annotations

import pytest
import torch

from dashdiff import training as T
from launch_utils import ROOT, load_script, reset_accelerate

SUBJECT = str(ROOT / "assets" / "subject")  # 5 images


def test_dreambooth_steps_after_each_accumulation_window_and_at_each_epoch_end(db, tmp_path):
    """5 images in batches of 2: 3 micro-batches per epoch; accumulation 2: steps after micro-batches 2 and 3 of
    each epoch, so 4 steps span 2 epochs as (epoch 0, 0, 1, 1). One micro-batch early would step after every
    micro-batch (0, 0, 0, 1); one late after 3 (0, 1, 2, 3)."""
    out = tmp_path / "accum"
    reset_accelerate()
    torch.manual_seed(0)
    try:
        db.main(db.parse_args([
            "--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", SUBJECT,
            "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_train_steps", "4", "--checkpointing_steps", "100",
            "--learning_rate", "1e-3", "--output_dir", str(out), "--report_to", "none"]))
    finally:
        reset_accelerate()
    rows = [r for r in T.StepLog.read(out / T.STEP_LOG) if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]


@pytest.fixture(scope="module")
def commonsense():
    return load_script("train/commonsense_dash.py", reuse=True)


@pytest.mark.parametrize("n,micro,per_step", [(10, 2, 2), (9, 2, 3), (8, 4, 1)])
def test_commonsense_steps_take_their_micro_batches_once_per_epoch(commonsense, n, micro, per_step):
    """Every example once per epoch, in micro-batches of ``micro`` (the last one short), ``per_step`` of them per
    optimizer step and fewer only in an epoch's last step; epochs follow each other."""
    plan = commonsense.BatchPlan(n, micro, per_step, seed=0)
    micro_per_epoch = -(-n // micro)
    steps_per_epoch = -(-micro_per_epoch // per_step)
    assert plan.steps_per_epoch == steps_per_epoch
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            got_epoch, batches = plan.step(s)
            last = s == (epoch + 1) * steps_per_epoch - 1
            want = micro_per_epoch - per_step * (steps_per_epoch - 1) if last else per_step
            assert got_epoch == epoch and len(batches) == want, (s, len(batches))
            assert all(len(b) == micro for b in batches[:-1]) and 1 <= len(batches[-1]) <= micro
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(n)), epoch
