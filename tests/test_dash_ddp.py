"""LoRA-Dash under DDP with two real CPU processes: δ and the launched directions agree."""

import torch
from safetensors.torch import load_file

from launch_utils import accelerate_launch


def test_two_processes_share_directions_and_delta(tmp_path):
    accelerate_launch("tests/scripts/ddp_dash.py", str(tmp_path / "rank"), processes=2)
    r0, r1 = (load_file(tmp_path / f"rank{i}.safetensors") for i in (0, 1))
    assert int(r0["world"]) == int(r1["world"]) == 2
    assert int(r0["launch_step"]) == int(r1["launch_step"]) == 2
    assert set(r0) == set(r1)
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    # the run trained δ: identical on both ranks because DDP reduced its gradient
    assert r0["q_proj.delta"].abs().sum() > 0
