"""train/dreambooth_eval.py (issue 14 item 5): DINO / CLIP-I / CLIP-T through transformers' real
loading code, on tiny random encoders built from configs and saved to a temporary folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch_utils import ROOT, load_script

DE = load_script("train/dreambooth_eval.py", reuse=True)
SUBJECT = ROOT / "assets" / "subject"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random ViT (DINO's shape: 224 px, patch 16) and a tiny random CLIP with its processor
    and tokenizer, saved with save_pretrained like a downloaded model."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, ViTConfig, ViTModel

    from dashdiff.testing import tiny_clip_tokenizer

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64))
    vit.save_pretrained(root / "dino")
    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessorPil().save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    return root


def _refs(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "refs"
    d.mkdir()
    for f in sorted(SUBJECT.glob("*.png"))[:n]:
        Image.open(f).convert("RGB").save(d / f.name)
    return d


# --------------------------------------------------------------------------- statistics


def test_t_quantiles_and_the_interval_of_a_known_sample():
    # Student's t 0.975 quantiles to 9 significant digits; measured error <= 3.7e-8 (df 1, the heaviest tail).
    for df, t in ((1, 12.7062047), (2, 4.30265273), (4, 2.77644511), (9, 2.26215716), (29, 2.04522964),
                  (1000, 1.96233908)):
        assert DE.t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    ci = DE.mean_ci([1, 2, 3, 4, 5])  # mean 3, sd sqrt(2.5), se 0.70711, t(4) 2.77645
    assert ci["mean"] == 3 and ci["sd"] == pytest.approx(math.sqrt(2.5), abs=1e-12)
    assert ci["half_width"] == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5)
    assert ci["low"] == pytest.approx(1.03676, abs=1e-4) and ci["high"] == pytest.approx(4.96324, abs=1e-4)
    one = DE.mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["half_width"]) and DE.format_ci(one) == "0.500 (n=1)"
    assert DE.mean_ci([2.0, 2.0])["half_width"] == 0


def test_identifier_is_stripped_as_a_word_only():
    assert DE.strip_identifier("a photo of sks toy on the beach", "sks") == "a photo of toy on the beach"
    assert DE.strip_identifier("a red SKS toy", "sks") == "a red toy"
    assert DE.strip_identifier("sks, a toy", "sks") == ", a toy"
    assert DE.strip_identifier("a photo of asks toy", "sks") == "a photo of asks toy"  # not inside words


# --------------------------------------------------------------------------- the DINO transform


def _reference_transform(img: Image.Image) -> np.ndarray:
    """DINO's eval transform written independently with PIL + numpy: shorter side to 256 (PIL
    bicubic, the long side truncated as torchvision does), centre crop 224 (torchvision's rounding),
    /255, ImageNet normalisation; (3, 224, 224) float64."""
    w, h = img.size
    if w <= h:
        nw, nh = 256, int(256 * h / w)
    else:
        nw, nh = int(256 * w / h), 256
    r = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    a = np.asarray(r, dtype=np.float64)[top:top + 224, left:left + 224] / 255.0
    a = (a - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return a.transpose(2, 0, 1)


def test_dino_transform_matches_an_independent_implementation():
    proc = DE.dino_processor()
    rng = np.random.default_rng(0)
    # Square 64 px (the miniature), a real subject photo, and non-square images of both orientations.
    images = [Image.open(sorted(SUBJECT.glob("*.png"))[0]),
              Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (96, 130, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (257, 301, 3), dtype=np.uint8)),  # odd crop margin
              Image.fromarray(rng.integers(0, 256, (301, 257, 3), dtype=np.uint8))]  # long side 299.8 -> 299
    for img in images:
        ours = DE.dino_pixels(proc, [img])[0].double().numpy()
        ref = _reference_transform(img)
        assert ours.shape == (3, 224, 224)
        # Measured: max |diff| 3.7e-7 (float32 rounding of the normalised values, |x| <= 2.7).
        assert np.abs(ours - ref).max() < 2e-6


# --------------------------------------------------------------------------- encoders and scoring


def test_identical_images_score_one_and_the_table_is_written(encoders, tmp_path):
    refs = _refs(tmp_path)
    gen = tmp_path / "gen"
    gen.mkdir()
    files = sorted(refs.iterdir())
    rows = []
    for k, f in enumerate(files):
        Image.open(f).save(gen / f"g{k}.png")
        rows.append({"file_name": f"g{k}.png", "prompt": "a photo of sks toy on the beach", "seed": k})
    (gen / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = DE.load_encoders(str(encoders / "dino"), str(encoders / "clip"))
    samples = DE.read_samples(gen)
    # One reference: each generated image against the identical reference scores 1.
    for k, s in enumerate(samples):
        res = DE.score([s], [files[k]], enc)["samples"][0]
        assert abs(res["dino"] - 1) < 1e-5 and abs(res["clip_i"] - 1) < 1e-5  # measured 1.2e-7
    # Against all three, the mean includes the other images' cosines: below 1 for the distinct ones.
    full = DE.score(samples, files, enc)
    emb = DE.dino_embed(enc, DE.load_images(files))
    # The DINO embedding is the CLS token of the last (normed) hidden state, unit length.
    with torch.no_grad():
        hidden = enc.dino(pixel_values=DE.dino_pixels(enc.dino_processor, DE.load_images(files))).last_hidden_state
    assert torch.allclose(emb, torch.nn.functional.normalize(hidden[:, 0], dim=-1), atol=1e-6)
    expect = (emb @ emb.t()).mean(1)
    assert torch.allclose(torch.tensor([r["dino"] for r in full["samples"]]), expect, atol=1e-6)
    assert all(r["dino"] < 1 - 1e-4 for r in full["samples"])
    # CLIP-I is CLIP's projected image embedding after the model folder's own processor (CLIP's transform).
    from transformers import CLIPImageProcessorPil

    px = CLIPImageProcessorPil.from_pretrained(encoders / "clip")(images=DE.load_images(files), return_tensors="pt")
    with torch.no_grad():
        feats = enc.clip.get_image_features(pixel_values=px["pixel_values"])
    feats = feats if torch.is_tensor(feats) else feats.pooler_output
    assert torch.allclose(DE.clip_image_embed(enc, DE.load_images(files)),
                          torch.nn.functional.normalize(feats, dim=-1), atol=1e-6)
    # CLIP-T embeds the prompt without the identifier.
    t_plain = DE.clip_text_embed(enc, ["a photo of toy on the beach"])
    img = DE.clip_image_embed(enc, DE.load_images([samples[0].file]))
    assert full["samples"][0]["clip_t"] == pytest.approx(float(img[0] @ t_plain[0]), abs=1e-6)
    t_with = DE.clip_text_embed(enc, ["a photo of sks toy on the beach"])
    assert abs(float(img[0] @ t_with[0]) - full["samples"][0]["clip_t"]) > 1e-4
    # The summary is mean_ci of the per-sample values.
    assert full["summary"]["dino"] == DE.mean_ci([r["dino"] for r in full["samples"]])

    out = tmp_path / "out"
    payload = DE.main(DE.parse_args(["--images_dir", str(gen), "--reference_dir", str(refs), "--dino_model",
                                     str(encoders / "dino"), "--clip_model", str(encoders / "clip"),
                                     "--output_dir", str(out)]), log=lambda s: None)
    saved = json.loads((out / DE.RESULT_JSON).read_text())
    assert saved["summary"]["clip_t"]["mean"] == pytest.approx(payload["summary"]["clip_t"]["mean"])
    md = (out / DE.RESULT_MD).read_text()
    assert "| DINO |" in md and "| CLIP-T |" in md and " ± " in md
    assert sorted(p.name for p in out.iterdir()) == [DE.RESULT_JSON, DE.RESULT_MD]  # no temporary left


def test_generate_then_score_on_the_tiny_pipeline(encoders, tmp_path):
    refs = _refs(tmp_path, 2)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "tiny-sd", "--reference_dir", str(refs), "--prompts",
            "a photo of sks toy on the beach", "a sks toy in the snow", "--seeds", "0", "1",
            "--num_inference_steps", "2", "--resolution", "64", "--dino_model", str(encoders / "dino"),
            "--output_dir", str(out)]
    payload = DE.main(DE.parse_args(argv), log=lambda s: None)
    rows = [json.loads(x) for x in (out / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in argv[5:7] for s in (0, 1)]
    assert payload["summary"]["dino"]["n"] == 4 and Image.open(out / "images" / rows[0]["file_name"]).size == (64, 64)
    # Generation is seeded: the same (prompt, seed) gives the same pixels again.
    pipe = DE.load_pipeline("tiny-sd")
    again = DE.generate_images(pipe, ["a photo of sks toy on the beach"], [1], tmp_path / "again", steps=2,
                               resolution=64)
    assert np.array_equal(np.asarray(Image.open(again[0].file)), np.asarray(Image.open(out / "images" / rows[1]["file_name"])))


def test_bad_inputs_are_one_line_errors(encoders, tmp_path, capsys):
    refs = _refs(tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("x")
    base = ["--reference_dir", str(refs), "--output_dir", str(tmp_path / "o")]
    cases = [
        (["--images_dir", str(tmp_path / "nope"), "--dino_model", str(encoders / "dino")], "no such folder"),
        (["--images_dir", str(empty), "--dino_model", str(encoders / "dino")], "no images there"),
        (["--images_dir", str(refs), "--dino_model", str(notmodel)], "not a model folder"),
        (["--images_dir", str(refs), "--clip_model", str(encoders / "dino")], "a vit model, not CLIP"),
        (["--images_dir", str(refs), "--dino_model", str(encoders / "clip")], "a clip model, not a ViT"),
        (["--images_dir", str(refs), "--dino_model", "no-such/model-id"], "not a loadable model"),
        (["--images_dir", str(refs), "--clip_model", str(tmp_path / "gone")], "no such folder"),
        (["--images_dir", str(refs), "--clip_model", str(encoders / "clip")], "CLIP-T needs each image's prompt"),
    ]
    for extra, msg in cases:
        assert DE.cli(base + extra) == 1
        err = capsys.readouterr().err
        # One error line (transformers' progress bars may share stderr), no traceback.
        lines = [x for x in err.splitlines() if x.startswith("dreambooth_eval.py: error:")]
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
    for extra, msg in ((["--images_dir", str(refs)], "nothing to compute"),
                       (["--dino_model", "x"], "either --pretrained_model_name_or_path")):
        with pytest.raises(SystemExit):
            DE.parse_args(base + extra)
        assert msg in capsys.readouterr().err


def test_pipeline_components_share_one_dtype_whatever_the_saved_dtype():
    """mini-sd is saved in fp16. Loaded without an explicit dtype, diffusers upcasts its models to
    float32 and transformers keeps the fp16 text encoder, so the UNet got half embeddings on the GPU
    (the first full quality run failed so). Every component must come out in the one chosen dtype."""
    assert DE.pipeline_dtype("cpu") == torch.float32
    assert DE.pipeline_dtype("cuda") == torch.float16 and DE.pipeline_dtype("cuda:1") == torch.float16
    assert DE.pipeline_dtype("cuda", "float32") == torch.float32
    for dtype, want in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        pipe = DE.load_pipeline("mini-sd", device="cpu", dtype=dtype)
        got = {name: {p.dtype for p in getattr(pipe, name).parameters()} for name in ("unet", "vae", "text_encoder")}
        assert got == {name: {want} for name in got}, (dtype, got)
