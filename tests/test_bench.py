"""The benchmark suite runs at CPU size (a smoke run: the GPU targets are measured on GPUs)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import dreambooth_grid as G  # noqa: E402
import infer_time  # noqa: E402
import launch_time  # noqa: E402
import step_time  # noqa: E402


def test_step_time_table():
    text = step_time.main(["--model", "tiny-unet", "--steps", "1", "--warmup", "0"])
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[3].endswith("x") and cells[0] != "method":
            rows[cells[0]] = (float(cells[1]), float(cells[3][:-1]))
    assert list(rows) == ["lora_r", "dash_pre", "dash", "dense_dash", "lora_r+s"]
    # one step each: every ratio is that method's step time over lora_r's (to the printed digits)
    base = rows["lora_r"][0]
    assert rows["lora_r"][1] == 1.0
    h, hr = 5e-5, 5e-4  # half a unit of the printed last digit: times (4 decimals), ratios (3)
    for method, (median, ratio) in rows.items():
        assert (median - h) / (base + h) - hr <= ratio <= (median + h) / (base - h) + hr, (method, median, base, ratio)


def test_launch_time_sections():
    text = launch_time.main(["--model", "tiny-unet", "--selection_shapes", "48x32", "--trials", "1",
                             "--sections", "selection,launch", "--published_sample", "1"])
    assert "| 48 x 32 | 1/1 | 1/1 |" in text  # small matrices: every path agrees with float64 SVD
    assert "dashdiff at launch" in text


def table_rows(text: str, n_cells: int) -> dict[str, list[str]]:
    """Markdown table rows of ``text`` with ``n_cells`` cells, by first cell (header and rule left out)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == n_cells and cells[-1].endswith("x"):
            rows[cells[0]] = cells
    return rows


def test_infer_time_table():
    text = infer_time.main(["--model", "tiny-unet", "--steps", "2", "--warmup", "1"])
    rows = {k: (float(v[1]), float(v[3][:-1])) for k, v in table_rows(text, 4).items()}
    assert list(rows) == ["lora r, unfused", "export r+s, unfused", "lora r, fused", "export r+s, fused"]
    h, hr = 5e-5, 5e-4  # half a unit of the printed last digit
    for name, (median, ratio) in rows.items():  # against lora r with the same fusing
        base = rows["lora r, fused" if name.endswith(", fused") else "lora r, unfused"][0]
        assert (median - h) / (base + h) - hr <= ratio <= (median + h) / (base - h) + hr, (name, median, base, ratio)


def test_autolora_cost_variants():
    import autolora_cost
    import torch

    threads = torch.get_num_threads()  # the bench sets its own thread count
    try:
        res = autolora_cost.main(autolora_cost.parse_args(["--rounds", "2", "--warmup", "0", "--no_rollback"]))
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"plain LoRA step", "darts", "darts, batched FD", "first_order", "one forward+backward pass"}
    assert res["plain LoRA step"]["ratio"] == [1.0, 1.0, 1.0]  # the baseline, against itself, per round
    for r in res.values():
        assert r["ratio"][0] <= r["ratio"][1] <= r["ratio"][2] and r["ms"][0] <= r["ms"][1] <= r["ms"][2]


def test_ab_dash_function_table(tmp_path, capsys):
    import ab_dash_function

    old = tmp_path / "kernel_old.py"  # the A/B against the same function still runs both paths
    old.write_text((Path(__file__).resolve().parents[1] / "dashdiff" / "dash" / "kernel.py").read_text())
    ab_dash_function.main(["--model", "tiny-unet", "--device", "cpu", "--dtype", "float32", "--old", str(old),
                           "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert all(f"| {m} |" in out for m in ("lora_r", "lora_r+s", "dash", "dash_old"))


def test_dreambooth_grid_trains_renders_at_each_scale_and_reuses_runs(tmp_path):
    """bench/dreambooth_grid.py on mini-sd, one 2-step setting: at adapter scale 0 the run renders the
    base model's images exactly (so its scores equal the base row's), at scale 1 the trained adapter
    moves them; a finished run is reused; a bad settings file is a one-line error."""
    import json

    import numpy as np
    from PIL import Image

    settings = tmp_path / "grid.txt"
    settings.write_text('# hot learning rate: 2 steps must move the images\n'
                        'hot --method lora --rank 4 --learning_rate 1e-2 --max_train_steps 2 '
                        '--instance_prompt "a photo of sks toy indoors"\n')
    argv = ["--settings", str(settings), "--output_dir", str(tmp_path / "out"), "--seeds", "0",
            "--inference_steps", "2", "--scales", "1.0", "0.0", "--device", "cpu"]
    rows = G.main(G.parse_args(argv))
    base, hot = rows
    assert (base["setting"], hot["setting"]) == ("base", "hot")
    assert hot["scores"]["0.0"] == base["scores"]["1.0"]
    assert hot["scores"]["1.0"]["prompt"] != base["scores"]["1.0"]["prompt"]
    run = json.loads((tmp_path / "out" / "runs" / "hot__toycat" / "dashdiff_run.json").read_text())
    assert run["args"]["instance_prompt"] == "a photo of sks toy indoors" and run["global_step"] == 2
    montage = np.asarray(Image.open(tmp_path / "out" / "montage_toycat_s0.0.png"))
    assert montage.shape == (2 * 64, len(G.W.PROMPTS) * 64, 3)
    assert np.array_equal(montage[:64], montage[64:])  # scale 0: the base row again
    stamp = (tmp_path / "out" / "runs" / "hot__toycat" / "dashdiff_run.json").stat().st_mtime_ns
    G.main(G.parse_args(argv))
    assert (tmp_path / "out" / "runs" / "hot__toycat" / "dashdiff_run.json").stat().st_mtime_ns == stamp
    settings.write_text("base --method lora\n")
    with pytest.raises(SystemExit, match="'base' or repeated"):
        G.main(G.parse_args(argv))
