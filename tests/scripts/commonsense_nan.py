"""A commonsense run (launched by tests/test_commonsense_train.py with two processes) in which only
rank 1's training loss turns NaN, at its third training micro-batch. Both processes must stop at
the same step with the same message (issue 15: the verdict was per process, so rank 1 raised while
rank 0 waited forever in the gradient all-reduce). Each process prints ``STOPPED <message>``.

Usage: ``commonsense_nan.py ARGS...`` (the arguments of train/commonsense_dash.py)."""

import gc
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from launch_utils import load_script  # noqa: E402

cs = load_script(ROOT / "train" / "commonsense_dash.py")
real_loss = cs.summed_token_loss
calls = {"n": 0}


def nan_on_rank_1(model, batch):
    loss = real_loss(model, batch)
    if int(os.environ.get("RANK", "0")) == 1 and model.training:  # not the evaluation passes
        calls["n"] += 1
        if calls["n"] == 3:
            return loss * float("nan")
    return loss


def main(argv: list[str]) -> None:
    from dashdiff.training import NonFiniteLossError

    cs.summed_token_loss = nan_on_rank_1
    try:
        cs.main(cs.parse_args(argv))
        print("FINISHED", flush=True)
    except NonFiniteLossError as err:
        print(f"STOPPED {err}", flush=True)
    gc.collect()  # the DDP wrapper must not outlive the process group (see launch_utils)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
