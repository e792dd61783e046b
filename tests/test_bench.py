"""The benchmark suite runs at CPU size (a smoke run: the GPU targets are measured on GPUs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import infer_time  # noqa: E402
import launch_time  # noqa: E402
import step_time  # noqa: E402


def test_step_time_table():
    text = step_time.main(["--model", "tiny-unet", "--steps", "1", "--warmup", "0"])
    for method in ("lora_r", "dash_pre", "dash", "dense_dash", "lora_r+s"):
        assert f"| {method} |" in text


def test_launch_time_sections():
    text = launch_time.main(["--model", "tiny-unet", "--selection_shapes", "48x32", "--trials", "1",
                             "--sections", "selection,launch", "--published_sample", "1"])
    assert "| 48 x 32 | 1/1 | 1/1 |" in text  # small matrices: every path agrees with float64 SVD
    assert "dashdiff at launch" in text


def test_infer_time_table():
    text = infer_time.main(["--model", "tiny-unet", "--steps", "2", "--warmup", "1"])
    assert "| export r+s, fused |" in text
