"""bench/quality.py and its world encoder (issue 14 item 4), at CPU size before the pretrained
weights exist: the world encoder learns the scene attributes, its subject-fidelity metric moves when
a subject is shown and stays put when it is not, the TSD arithmetic is right on a known spectrum,
and the harness runs end to end on the tiny random pipeline (2 steps)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from launch_utils import ROOT, load_script

WE = load_script("assets/pretrain/world_encoders.py", reuse=True)
W = load_script("assets/pretrain/image_world.py", reuse=True)
Q = load_script("bench/quality.py", reuse=True)
DE = load_script("train/dreambooth_eval.py", reuse=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


SHIPPED = ROOT / "assets" / "models" / "world-encoder"


@functools.lru_cache(maxsize=1)
def heldout(n: int = 200):
    """Held-out scenes (split="test") and their labels, rendered once for the module."""
    return WE.labelled_scenes(n, 0, "test")


@pytest.fixture(scope="module")
def encoder():
    """The shipped world encoder (preset cpu; what bench/quality.py uses by default)."""
    return WE.load_world_encoder(SHIPPED)


def test_a_tiny_cpu_run_learns_attributes_above_chance_on_heldout_scenes(tmp_path):
    # The test preset: 80 steps on 400 scenes, seconds on one core.
    info = WE.main(["--output_dir", str(tmp_path), "--preset", "test", "--workers", "1", "--eval_scenes", "200",
                    "--log_every", "1000"])
    acc, chance = info["heldout_accuracy"], info["chance"]
    # Measured (seed 0, 200 scenes of split="test", whose kind-colour-background triples training never
    # saw): size 0.885, count 0.485, position 0.815, background 0.975; kind 0.18 and colour 0.12 need more
    # steps (the shipped encoder below). Bounds ~2 standard errors (<= 0.036) under the measurements.
    floor = {"size": 0.8, "count": 0.4, "position": 0.74, "background": 0.9}
    for head, lo in floor.items():
        assert acc[head] >= lo > 1.5 * chance[head], (head, acc[head], chance[head])
    # The saved folder reloads from the module alone and gives the same held-out accuracies.
    images, labels = heldout()
    assert WE.accuracies(WE.load_world_encoder(tmp_path / "encoder"), images, labels) == acc


def test_the_shipped_encoder_knows_every_attribute(encoder):
    info = json.loads((SHIPPED / WE.CONFIG).read_text())["info"]
    assert info["config"]["preset"] == "cpu" and info["steps"] == 1500
    # Recomputed here on 200 of the 1000 held-out scenes it was scored on (recorded: kind 0.905, colour
    # 0.985, size 0.997, count 0.997, position 0.910, background 1.000).
    images, labels = heldout()
    acc = WE.accuracies(encoder, images, labels)
    for head, recorded in info["heldout_accuracy"].items():
        assert acc[head] >= min(0.85, recorded - 0.06), (head, acc[head], recorded)
    assert json.loads((SHIPPED / WE.CONFIG).read_text())["vocab"]["background"] == list(W.BACKGROUNDS)


def test_world_encoder_training_resumes_exactly(tmp_path):
    def run(out, *extra):
        return WE.main(["--output_dir", str(out), "--preset", "test", "--n_scenes", "40", "--batch_size", "4",
                        "--max_steps", "4", "--eval_scenes", "8", "--workers", "1", "--log_every", "1000", *extra])

    whole = run(tmp_path / "a")
    run(tmp_path / "b", "--chunk_steps", "2")  # stops after a checkpoint at step 2
    resumed = run(tmp_path / "b", "--resume")
    assert resumed["chunks"] == 2 and resumed["heldout_accuracy"] == whole["heldout_accuracy"]
    a, b = (WE.load_world_encoder(tmp_path / x / "encoder").state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_encoder_of_world_version_2_knows_the_studio(tmp_path):
    """--world_version 2 trains on version-2 scenes with the studio as a seventh background; version 1
    (the shipped encoder's) is unchanged, and the two never share a scene cache."""
    v1, v2 = WE.vocabularies(1), WE.vocabularies(2)
    assert v2["background"] == v1["background"] + ["studio"] and {k: v for k, v in v2.items() if k != "background"} == \
        {k: v for k, v in v1.items() if k != "background"}
    assert WE.prompt_targets("a photo of sks toy in a studio", v2) == {"background": "studio"}
    assert WE.prompt_targets("a photo of sks toy in a studio", v1) == {}
    studio = v2["background"].index("studio")
    _, labels2 = WE.labelled_scenes(120, 0, "train", tmp_path / "data", 1, version=2)
    _, labels1 = WE.labelled_scenes(120, 0, "train", tmp_path / "data", 1)
    bg = (*WE.OBJECT_HEADS, *WE.CONTEXT_HEADS).index("background")
    assert 10 <= int((labels2[:, bg] == studio).sum()) and not (labels1[:, bg] >= len(v1["background"])).any()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["labelled-train-0-120.npz",
                                                                     "labelled-v2-train-0-120.npz"]
    # Each label is the scene's own attribute (scene 7 of version 2, read back from image_world).
    attrs = W.scene(7, 0, "train", version=2)[2]
    assert [v2[h][i] for h, i in zip((*WE.OBJECT_HEADS, *WE.CONTEXT_HEADS), labels2[7])] == \
        [str(attrs[h]) for h in (*WE.OBJECT_HEADS, *WE.CONTEXT_HEADS)]
    info = WE.main(["--output_dir", str(tmp_path / "run"), "--preset", "test", "--n_scenes", "40", "--batch_size", "4",
                    "--max_steps", "2", "--eval_scenes", "8", "--workers", "1", "--log_every", "1000",
                    "--world_version", "2"])
    assert info["world_version"] == 2 and info["config"]["world_version"] == 2
    assert WE.load_world_encoder(tmp_path / "run" / "encoder").config["vocab"]["background"][-1] == "studio"


def _teddies(n: int, salt: int) -> list:
    """The world's generic toy (the class prior "a photo of a toy") on the backgrounds of the prompts:
    what a model that did not learn the subject draws for "a photo of sks toy on the beach"."""
    bgs = list(W.BACKGROUNDS)
    return [W.render({**W.sample_attributes(1000 * salt + i), "kind": "toy", "count": 1, "background": bgs[i % 6]},
                     1000 * salt + i) for i in range(n)]


def test_subject_fidelity_moves_when_the_subject_is_learned_and_not_otherwise(encoder):
    model = encoder
    refs = [W.subject_image("toydog", k) for k in range(5)]
    bgs = list(W.BACKGROUNDS)
    # "Learned": the subject in new poses, in each asked context; "not learned": the class prior.
    n = 24
    learned = [W.subject_image("toydog", 5 + k, bgs[k % 6]) for k in range(n)]
    learned_plain = [W.subject_image("toydog", 30 + k) for k in range(n)]
    ci = {name: DE.mean_ci(WE.subject_fidelity(model, imgs, refs).tolist()) for name, imgs in
          (("learned", learned), ("plain", learned_plain), ("prior_a", _teddies(n, 1)), ("prior_b", _teddies(n, 2)))}
    # Per image: the mean over the references of the cosine of unit-norm object embeddings (DINO's rule).
    g, r = model.embed(WE.to_tensor(learned[:3])), model.embed(WE.to_tensor(refs))
    assert torch.allclose(g.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(WE.subject_fidelity(model, learned[:3], refs), (g @ r.t()).mean(1), atol=1e-6)
    # Measured: learned 0.824 ± 0.068, plain 0.801 ± 0.065, class prior 0.653 ± 0.041 and 0.644 ± 0.041.
    assert ci["learned"]["low"] > ci["prior_a"]["high"] and ci["learned"]["low"] > ci["prior_b"]["high"]
    gap = ci["learned"]["mean"] - ci["prior_a"]["mean"]
    # Not learned twice (other layouts): the metric stays put, within the intervals.
    assert abs(ci["prior_a"]["mean"] - ci["prior_b"]["mean"]) < min(ci["prior_a"]["half_width"], gap / 3)
    # The embedding is about the object: the subject's backgrounds move it far less than learning does.
    assert abs(ci["learned"]["mean"] - ci["plain"]["mean"]) < gap / 3
    # Prompt fidelity: the asked context scores high, another context low.
    right = WE.prompt_fidelity(model, learned, [f"a photo of sks toy {W.BACKGROUNDS[bgs[k % 6]]}" for k in range(n)])
    wrong = WE.prompt_fidelity(model, learned, [f"a photo of sks toy {W.BACKGROUNDS[bgs[(k + 1) % 6]]}"
                                                for k in range(n)])
    assert right.mean() > 0.95 and wrong.mean() < 0.02  # measured 0.9996 and 0.0003
    assert WE.prompt_targets("a red sks toy") == {"colour": "red"}
    assert WE.prompt_targets("a photo of sks toy in the snow") == {"background": "snow"}
    assert math.isnan(float(WE.prompt_fidelity(model, learned[:1], ["a photo of sks toy"])[0]))


# --------------------------------------------------------------------------- TSD arithmetic


def test_tsd_layer_on_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 12, 10
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    sigma = torch.linspace(10, 1, in_f, dtype=torch.float64)
    w0 = u[:, :in_f] @ torch.diag(sigma) @ v.t()
    chosen = [6, 8, 3]
    u_s = u[:, chosen] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # signs are arbitrary
    # ΔW moves σ_0 by 3.0, σ_2 by 0.2, σ_7 by 0.5, σ_8 by 0.1: by |Δσ| the top 3 are {0, 7, 2}, but by
    # the change rate |Δσ| / σ (0.3, 0.025, 0.167, 0.05) they are {0, 7, 8}: overlap {8} with the choice.
    dsig = torch.zeros(in_f, dtype=torch.float64)
    dsig[0], dsig[2], dsig[7], dsig[8] = 3.0, 0.2, 0.5, 0.1
    delta = u[:, :in_f] @ torch.diag(dsig) @ v.t()
    assert set(torch.argsort(dsig / sigma, descending=True)[:3].tolist()) == {0, 7, 8}
    row = Q.tsd_layer(w0, u_s, delta)
    assert row["positions"] == chosen and row["k"] == in_f and row["eligible"] == in_f
    assert row["relative"] == pytest.approx([6 / 9, 8 / 9, 3 / 9]) and row["match_min"] == pytest.approx(1)
    assert row["overlap"] == pytest.approx(1 / 3) and row["chance"] == pytest.approx(3 / 10)
    assert Q.layer_type("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0") == "attn2.to_out"


# --------------------------------------------------------------------------- the harness


def test_harness_end_to_end_on_the_tiny_pipeline(encoder, tmp_path, monkeypatch):
    out = tmp_path / "q"
    argv = ["--size", "test", "--sd_model", "tiny-sd", "--llama_model", "tiny-llama", "--world_encoder",
            str(SHIPPED), "--output_dir", str(out), "--sections", "subject,tsd,commonsense"]
    result = Q.main(Q.parse_args(argv), log=lambda s: None)
    size = Q.SIZES["test"]
    n = size["prompts"] * len(size["eval_seeds"]) * len(size["train_seeds"])
    summary = result["subject"]["summary"]
    assert set(summary) == {"base", "world", *size["methods"]}
    assert all(s["subject"]["n"] == n for s in summary.values())
    # The world's own drawing of the subject in the asked context is the ceiling of both metrics.
    assert summary["world"]["prompt"]["mean"] > 0.7 > summary["base"]["prompt"]["mean"]
    # The TSD section's independent SVD finds exactly the directions dashdiff's launch recorded.
    rows = [r for rs in result["tsd"]["by_type"].values() for r in rs]
    assert rows and all(r["agrees_with_launch"] and 0 <= r["overlap"] <= 1 for r in rows)
    assert {r["layer"].split(".")[-2 if r["layer"].endswith(".0") else -1] for r in rows} == {"to_q", "to_k", "to_v", "to_out"}
    cs = result["commonsense"]["summary"]
    assert set(cs) == set(size["cs_methods"]) and all(len(s["tasks"]) == 8 for s in cs.values())
    # dreambooth_eval's two adapter routes give the same image: the stock LoRA file (LoRA-Dash exported
    # as rank r + s) and the full dashdiff adapter.
    run = out / "runs" / "toydog" / "dash-r4-s8" / "seed0"
    images = []
    for kw in ({"lora_weights": str(run / "pytorch_lora_weights.safetensors")}, {"dashdiff_adapter": str(run)}):
        pipe = DE.load_pipeline("tiny-sd", **kw)
        images.append(pipe("a photo of sks toy", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                           height=64, width=64, output_type="np").images[0])
    base = DE.load_pipeline("tiny-sd")("a photo of sks toy", generator=torch.Generator().manual_seed(0),
                                       num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    # Measured: the two routes agree exactly (0.0); the 2-step adapter moves the image by 7e-3.
    assert abs(images[0] - images[1]).max() < 1e-5 < abs(images[0] - base).max()
    md = (out / "quality.md").read_text()
    assert "| dash-r4-s8 |" in md and "| attn2.to_k |" in md and "CPU" in md
    assert json.loads((out / "quality.json").read_text())["meta"]["size"] == "test"
    with pytest.raises(SystemExit, match="holds a --size test run"):
        Q.main(Q.parse_args([*argv[:1], "cpu", *argv[2:]]), log=lambda s: None)
    # Before a reserved model's folder exists, the default stops with a line naming it (nothing written).
    from dashdiff.testing import models

    monkeypatch.setitem(models.PRETRAINED_MODELS, "mini-sd", tmp_path / "models" / "mini-sd")
    with pytest.raises(SystemExit, match="--sd_model mini-sd: the pretrained miniature is not at .*models/mini-sd"):
        Q.main(Q.parse_args(["--size", "test", "--output_dir", str(tmp_path / "q2"), "--sections", "tsd"]))
    assert not (tmp_path / "q2").exists()


def test_commonsense_accuracy_moves_when_the_format_is_learned_and_not_otherwise(tmp_path):
    """The commonsense metric on the shipped mini-llama, one task at CPU size: without an adapter the
    model answers in its own plain form, which the LLM-Adapters extraction cannot read (0 right);
    60 LoRA r4 steps on the task's training records teach the format, and the answers it already
    knows come out (measured 26 / 37, chance 1 / 3). A run at learning rate 0 stays at 0."""
    TW = load_script("assets/pretrain/text_world.py", reuse=True)
    cs = load_script("train/commonsense_dash.py", reuse=True)
    ev = load_script("train/commonsense_eval.py", reuse=True)
    data = TW.write_world(tmp_path / "tw", seed=0, n_people=24)
    model = str(ROOT / "assets" / "models" / "mini-llama")

    def evaluate(tag: str, adapter: Path | None) -> float:
        argv = ["--dataset", "social_i_qa", "--data_dir", str(data), "--base_model", model, "--num_beams", "1",
                "--batch_size", "40", "--output_dir", str(tmp_path / tag), "--no_progress"]
        return ev.main(ev.parse_args(argv + (["--lora_weights", str(adapter)] if adapter else [])))["mean"]

    def train(tag: str, lr: str, steps: int) -> Path:
        out = tmp_path / tag
        Q._reset_accelerate()
        try:
            cs.main(cs.parse_args([
                "--base_model", model, "--data_path", str(data / "social_i_qa" / "train.json"), "--output_dir", str(out),
                "--val_set_size", "0", "--batch_size", "8", "--micro_batch_size", "8", "--max_train_steps", str(steps),
                "--learning_rate", lr, "--warmup_steps", "6", "--train_on_inputs", "false", "--seed", "0",
                "--adapter_name", "lora", "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", str(steps)]))
        finally:
            Q._reset_accelerate()
        return out

    assert evaluate("base", None) == 0.0
    assert evaluate("still", train("lr0", "1e-12", 2)) == 0.0
    assert evaluate("learned", train("lr5e-3", "5e-3", 60)) >= 0.55  # chance 0.33


def test_folders_split_by_subject_method_seed_or_rank_share_one_setting():
    """Runs split over processes along what is run (subjects, methods, seeds, sweep ranks) merge into
    one folder; a change of how a run is made (steps, learning rate) does not."""
    base = Q.run_setting("full", {"steps": 300, "lr": 1e-3})
    for choice in ({"subjects": ["toydog"]}, {"methods": ["lora-r4"]}, {"train_seeds": [1]},
                   {"rank_sweep": [8]}, {"cs_methods": ["dash-r4"]}, {"cs_seeds": [2]}):
        assert Q.run_setting("full", {"steps": 300, "lr": 1e-3, **choice}) == base
    assert Q.run_setting("full", {"steps": 301, "lr": 1e-3}) != base != Q.run_setting("full", {"steps": 300, "lr": 3e-3})
    assert Q.run_setting("cpu", {"steps": 300, "lr": 1e-3}) != base
    args = Q.parse_args(["--output_dir", "x", "--rank_sweep", "1", "16"])
    assert args.rank_sweep == [1, 16]
