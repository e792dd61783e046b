"""The miniature's DINO and CLIP-T: a small CNN trained on the image world's scene attributes.

The DreamBooth protocol (``train/dreambooth_eval.py``) scores subject fidelity with DINO and
prompt fidelity with CLIP-T. Neither knows the procedural world, so the miniature uses one
encoder trained on it (``image_world.scene``; its ``attributes`` are the labels):

- a shared convolutional trunk over the 64 px image, then two branches:
  - the **object** branch: an embedding (``embed_dim``) that feeds the kind / colour / size / count
    classifiers. Its unit-norm embedding is the **subject-fidelity embedding** (the DINO stand-in):
    it has to describe the object and has no reason to describe the background, so a subject
    recontextualised on the beach stays close to its studio references.
  - the **context** branch: an embedding that feeds the background / position classifiers.
- **Prompt fidelity** (the CLIP-T stand-in): the probability the classifiers give the attributes a
  prompt asks for (its background phrase, its colour word): "a photo of sks toy on the beach" scores
  P(background = beach | image), "a red sks toy" P(colour = red | image).

The subjects of the DreamBooth protocol (``image_world.SUBJECTS``) are never shown to it: like
DINO, it embeds subjects it was not trained on.

Training is chunked and resumable exactly like the pretraining scripts (``_common.train_chunked``:
``--max_minutes`` / ``--chunk_steps``, ``--resume``, checkpoints that travel), so it can run on the
GPU machine; the ``mini`` preset also trains on CPU (README). The result is a folder with
``world_encoder.safetensors`` and ``config.json`` (architecture, label vocabularies, held-out
accuracies), loadable with :func:`load_world_encoder` from this file alone (torch + safetensors).

    python assets/pretrain/world_encoders.py --output_dir .pretrain/world-encoder --preset mini
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

WEIGHTS = "world_encoder.safetensors"
CONFIG = "config.json"
OBJECT_HEADS = ("kind", "colour", "size", "count")
CONTEXT_HEADS = ("position", "background")

PRESETS: dict[str, dict[str, Any]] = {
    # The shipped size, for the GPU machine (README: measured).
    "mini": {"channels": (32, 64, 96, 128), "embed_dim": 128, "context_dim": 64, "n_scenes": 20000,
             "batch_size": 128, "steps": 3000, "lr": 2e-3},
    # The same recipe at a CPU size (README: measured).
    "cpu": {"channels": (16, 32, 48, 64), "embed_dim": 96, "context_dim": 48, "n_scenes": 10000,
            "batch_size": 64, "steps": 1500, "lr": 2e-3},
    # Seconds on CPU, for the tests: already well above chance on held-out scenes.
    "test": {"channels": (8, 16, 24, 32), "embed_dim": 32, "context_dim": 16, "n_scenes": 400,
             "batch_size": 32, "steps": 80, "lr": 4e-3},
}


def vocabularies(version: int = 1) -> dict[str, list[str]]:
    """The label vocabulary of each head, from the image world."""
    import image_world as W

    return {"kind": list(W.KINDS), "colour": list(W.COLOURS), "size": list(W.SIZES),
            "count": ["1", "2", "3", "4"], "position": list(W.POSITIONS),
            "background": list(W.BACKGROUNDS if version == 1 else W.BACKGROUNDS_V2)}


# =========================================================================== the model


class WorldEncoder(nn.Module):
    """Trunk of 4 stride-2 conv blocks (64 -> 4 px), flattened (position survives), then the object
    and context branches and one linear classifier per attribute. Input (n, 3, 64, 64) in [-1, 1]."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        ch = [3, *config["channels"]]
        blocks: list[nn.Module] = []
        for a, b in zip(ch[:-1], ch[1:]):
            blocks += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(min(8, b), b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        self.trunk = nn.Sequential(*blocks)
        flat = ch[-1] * 4 * 4
        self.object = nn.Sequential(nn.Flatten(), nn.Linear(flat, config["embed_dim"]))
        self.context = nn.Sequential(nn.Flatten(), nn.Linear(flat, config["context_dim"]))
        vocab = config["vocab"]
        self.heads = nn.ModuleDict(
            {h: nn.Linear(config["embed_dim"], len(vocab[h])) for h in OBJECT_HEADS}
            | {h: nn.Linear(config["context_dim"], len(vocab[h])) for h in CONTEXT_HEADS})

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(object embedding (n, embed_dim), context embedding (n, context_dim)), before the heads."""
        h = self.trunk(x)
        return self.object(h), self.context(h)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head: {name: (n, classes)}."""
        obj, ctx = self.features(x)
        # The heads see the embeddings through a nonlinearity, so the embeddings themselves stay a
        # general description rather than a set of logits.
        obj, ctx = F.silu(obj), F.silu(ctx)
        return {h: self.heads[h](obj if h in OBJECT_HEADS else ctx) for h in self.heads}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm subject-fidelity embeddings (n, embed_dim), float32."""
        return F.normalize(self.features(x)[0].float(), dim=-1)

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities of every head: {name: (n, classes)}."""
        return {h: v.float().softmax(-1) for h, v in self(x).items()}


def to_tensor(images: Sequence[Any], size: int = 64) -> torch.Tensor:
    """PIL images (any size; resized with Lanczos like the world's own downsampling) or uint8
    arrays (n, 64, 64, 3) -> float (n, 3, size, size) in [-1, 1]."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if im.size == (size, size)
                                   else im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS),
                                   dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# =========================================================================== the two metrics


def subject_fidelity(model: WorldEncoder, generated: Sequence[Any], references: Sequence[Any]) -> torch.Tensor:
    """(n,) per generated image: the mean cosine, in the object embedding, to the references
    (DINO's protocol with the world encoder in place of DINO)."""
    model.eval()
    g = model.embed(to_tensor(generated))
    r = model.embed(to_tensor(references))
    return (g @ r.t()).mean(1)


def prompt_targets(prompt: str, vocab: dict[str, list[str]] | None = None) -> dict[str, str]:
    """The attributes a prompt asks for: its background phrase ("on the beach" -> background beach)
    and a colour word ("a red sks toy" -> colour red). Only these two: the protocol's prompts ask
    for a context or a property, and the other attributes are the subject's own."""
    import image_world as W

    vocab = vocab or vocabularies()
    text = prompt.lower()
    out: dict[str, str] = {}
    for name, phrase in W.BACKGROUNDS_V2.items():  # the studio counts only for a version-2 encoder
        if re.search(rf"\b{re.escape(phrase)}\b", text) and name in vocab["background"]:
            out["background"] = name
    for colour in vocab["colour"]:
        if re.search(rf"\b{colour}\b", text):
            out["colour"] = colour
    return out


def prompt_fidelity(model: WorldEncoder, images: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
    """(n,) per image: the mean probability the classifiers give to the attributes its prompt asks
    for (:func:`prompt_targets`); NaN where the prompt asks for none."""
    model.eval()
    vocab = model.config["vocab"]
    p = model.probs(to_tensor(images))
    out = torch.full((len(prompts),), float("nan"))
    for i, prompt in enumerate(prompts):
        wanted = prompt_targets(prompt, vocab)
        if wanted:
            out[i] = sum(float(p[h][i, vocab[h].index(v)]) for h, v in wanted.items()) / len(wanted)
    return out


# =========================================================================== save / load


def save_world_encoder(model: WorldEncoder, folder: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """``world_encoder.safetensors`` (float32) + ``config.json`` (the model config and ``info``),
    written to a temporary folder and renamed (an old folder is replaced only when complete)."""
    from safetensors.torch import save_file

    import _atomic

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        _atomic.write_json_atomic(tmp / CONFIG, {**model.config, "info": info})

    return _atomic.save_folder_atomic(folder, write, replace=True)


def load_world_encoder(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> WorldEncoder:
    """The encoder saved in ``folder`` (eval mode). Needs only torch and safetensors."""
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: not a world encoder folder (needs {CONFIG} and {WEIGHTS}); train one with "
                                "python assets/pretrain/world_encoders.py --output_dir DIR")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    config.pop("info", None)
    model = WorldEncoder(config)
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.to(device).eval()


# =========================================================================== data and training


def _render(args: tuple[int, int, int, str, int]) -> tuple[np.ndarray, np.ndarray]:
    import image_world as W

    start, stop, seed, split, version = args
    vocab = vocabularies(version)
    imgs, labels = [], []
    for i in range(start, stop):
        img, _, attrs = W.scene(i, seed, split, version=version)
        imgs.append(np.asarray(img, dtype=np.uint8))
        labels.append([vocab[h].index(str(attrs[h])) for h in (*OBJECT_HEADS, *CONTEXT_HEADS)])
    return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def labelled_scenes(n: int, seed: int = 0, split: str = "train", cache: Path | None = None,
                    workers: int = 1, version: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Scenes 0..n-1 of world ``version``: uint8 images (n, 64, 64, 3) and labels (n, 6) in head order
    (kind, colour, size, count, position, background); cached as ``cache/labelled-...npz`` if given."""
    import _common as C

    path = cache / f"labelled-{C.world_version_tag(version)}{split}-{seed}-{n}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["images"], z["labels"]
    chunks = [(s, min(n, s + 1000), seed, split, version) for s in range(0, n, 1000)]
    if workers > 1 and len(chunks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render, chunks))
    else:
        parts = [_render(c) for c in chunks]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    return images, labels


def _flip_position(labels: torch.Tensor, vocab: dict[str, list[str]]) -> torch.Tensor:
    # A mirrored scene swaps left and right; the centre stays.
    pos = (*OBJECT_HEADS, *CONTEXT_HEADS).index("position")
    left, right = vocab["position"].index("left"), vocab["position"].index("right")
    out = labels.clone()
    col = out[:, pos]
    out[:, pos] = torch.where(col == left, right, torch.where(col == right, left, col))
    return out


def accuracies(model: WorldEncoder, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> dict[str, float]:
    """Per-head accuracy on labelled scenes."""
    model.eval()
    names = (*OBJECT_HEADS, *CONTEXT_HEADS)
    hits = dict.fromkeys(names, 0)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(to_tensor(images[i:i + batch]).to(next(model.parameters()).device))
            y = torch.from_numpy(labels[i:i + batch])
            for k, h in enumerate(names):
                hits[h] += int((logits[h].argmax(-1).cpu() == y[:, k]).sum())
    return {h: hits[h] / len(images) for h in names}


def chance(vocab: dict[str, list[str]]) -> dict[str, float]:
    """1 / classes per head (the world samples each attribute uniformly)."""
    return {h: 1 / len(v) for h, v in vocab.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    import _common as C
    import image_world as W

    p = argparse.ArgumentParser(description="Train the world encoder (the miniature's DINO / CLIP-T stand-in).")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world_seed", type=int, default=0)
    p.add_argument("--world_version", type=int, choices=W.WORLD_VERSIONS, default=1,
                   help="image world version (image_world.py); 2 adds the studio background and varied toys")
    p.add_argument("--n_scenes", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--eval_scenes", type=int, default=1000, help="held-out (split='test') scenes for the accuracies")
    p.add_argument("--workers", type=int, default=None, help="processes rendering the scenes (default: all cores)")
    p.add_argument("--device", default=None)
    C.add_chunk_args(p)
    args = p.parse_args(argv)
    C.check_chunk_args(p, args)
    C.check_positive(p, args, ("max_steps", "chunk_steps", "n_scenes", "batch_size", "eval_scenes"))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (one chunk, or to the end), and when ``--max_steps`` is reached write
    ``<output_dir>/encoder`` with held-out accuracies; returns the info dict."""
    import _common as C

    args = parse_args(argv)
    device = C.setup_device(args)
    preset = PRESETS[args.preset]
    steps = args.max_steps or preset["steps"]
    lr = args.learning_rate or preset["lr"]
    n, batch = args.n_scenes or preset["n_scenes"], args.batch_size or preset["batch_size"]
    version = args.world_version
    vocab = vocabularies(version)
    arch = {"channels": list(preset["channels"]), "embed_dim": preset["embed_dim"],
            "context_dim": preset["context_dim"], "vocab": vocab, "image_size": 64, "input": "RGB in [-1, 1]"}
    cfg = {"preset": args.preset, "seed": args.seed, "world_seed": args.world_seed, "n_scenes": n,
           "batch_size": batch, "max_steps": steps, "lr": lr, **C.world_version_config(version)}
    workers = args.workers or min(16, os.cpu_count() or 1)
    images, labels = labelled_scenes(n, args.world_seed, "train", args.output_dir / "data", workers, version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = WorldEncoder(arch)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(min(200, steps // 10 + 1), steps))
    names = (*OBJECT_HEADS, *CONTEXT_HEADS)

    def loss_fn(step: int) -> torch.Tensor:
        rng = C.step_rng(args.seed, step, "batch")
        idx = [rng.randrange(n) for _ in range(batch)]
        flip = torch.tensor([rng.random() < 0.5 for _ in range(batch)])
        x = to_tensor(images[idx])
        y = torch.from_numpy(labels[idx])
        # Mirror half the batch (left <-> right): more poses of every object for the same scenes.
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None], _flip_position(y, vocab), y)
        model.train()
        logits = model(x.to(device))
        y = y.to(device)
        return sum(F.cross_entropy(logits[h], y[:, k]) for k, h in enumerate(names)) / len(names)

    state, done = C.train_chunked(args=args, folder=args.output_dir / "train", modules={"encoder": model},
                                  optimizer=opt, scheduler=sched, loss_fn=loss_fn, config=cfg, max_steps=steps,
                                  device=device)
    info: dict[str, Any] = {"steps": state.step, "seconds": round(state.seconds, 3), "chunks": state.chunks,
                            "final_loss": C.mean_tail(state.losses), "device": C.device_info(device), "config": cfg,
                            "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    if done:
        ev_images, ev_labels = labelled_scenes(args.eval_scenes, args.world_seed, "test", args.output_dir / "data",
                                               workers, version)
        info["world_version"] = version
        info["heldout_accuracy"] = accuracies(model, ev_images, ev_labels)
        info["chance"] = chance(vocab)
        final = save_world_encoder(model.cpu(), args.output_dir / "encoder", info)
        print("held-out accuracy: " + ", ".join(f"{h} {a:.3f} (chance {info['chance'][h]:.3f})"
                                                for h, a in info["heldout_accuracy"].items()))
        print(f"world encoder: {final}")
    return info


if __name__ == "__main__":
    main()
