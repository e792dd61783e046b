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


def test_autolora_cost_variants():
    import autolora_cost
    import torch

    threads = torch.get_num_threads()  # the bench sets its own thread count
    try:
        res = autolora_cost.main(autolora_cost.parse_args(["--rounds", "2", "--warmup", "0", "--no_rollback"]))
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"plain LoRA step", "darts", "darts, batched FD", "first_order", "one forward+backward pass"}
    assert all(r["ratio"][1] > 0 for r in res.values())


def test_ab_dash_function_table(tmp_path, capsys):
    import ab_dash_function

    old = tmp_path / "functional_old.py"  # the A/B against the same function still runs both paths
    old.write_text((Path(__file__).resolve().parents[1] / "dashdiff" / "functional.py").read_text())
    ab_dash_function.main(["--model", "tiny-unet", "--device", "cpu", "--dtype", "float32", "--old", str(old),
                           "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert all(f"| {m} |" in out for m in ("lora_r", "lora_r+s", "dash", "dash_old"))
