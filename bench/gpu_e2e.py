"""Real-size end-to-end suite: the training scripts run as a user runs them, on a GPU machine.

Builds random-weight models from the real configurations once (SD 1.5, SDXL base with the fp16-fix
VAE, LLaMA-7B; tokenizers from ``dashdiff.testing``), then runs each case through ``accelerate launch``
and prints one Markdown table: case, status, wall time, training steps/s, peak GPU memory, LoRA-Dash
launch seconds. Every export is reloaded with stock diffusers / PEFT in a process that never
imports dashdiff (``bench/stock_reload.py``). Random weights: this checks that everything runs at
real size and on the device, not image quality.

    python bench/gpu_e2e.py --models .gpu/models --configs .gpu/configs --groups sdxl      # one GPU
    python bench/gpu_e2e.py --models .gpu/models --configs .gpu/configs --groups ddp --gpus 2
    python bench/gpu_e2e.py --tiny --groups sd,llama                                       # CPU dry run

Groups: ``sdxl`` (LoRA and LoRA-Dash in bf16 with the kohya export; the LoRA-Dash run killed after
its first checkpoint and resumed with ``latest`` across the launch), ``sdxl_recipe`` (AutoLoRA in
bf16; the published fp16 recipe with the fp16-fix VAE, accumulation 4, text-encoder training,
prior preservation with generated class images and cached latents), ``sd`` (SD 1.5: fp16 AutoLoRA killed inside its search and resumed; LoRA with
the kohya export), ``llama`` (LLaMA-7B commonsense LoRA-Dash train, then
``commonsense_eval.py --dataset all``), ``ddp`` (each script on ``--gpus`` processes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "assets" / "subject"
COMMONSENSE = ROOT / "tests" / "fixtures" / "commonsense"


# ---------------------------------------------------------------------------------------- models
def _json(path: Path) -> dict:
    cfg = json.loads(path.read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _clip(cfg_file: Path, tok, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**_json(cfg_file))
    # The tiny tokenizer's ids: CLIP pools at its EOS token.
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_sd(folder: Path, configs: Path, family: str) -> None:
    """A random-weight SD 1.5 or SDXL base pipeline from the real configs, saved in fp16; for SDXL
    also ``<folder>-vae-fp16-fix`` (the same VAE with ``force_upcast`` off, as madebyollin's)."""
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from dashdiff.testing import tiny_clip_tokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    with torch.device(dev):  # random init on the GPU: minutes faster than on the host at 2.6B
        unet = UNet2DConditionModel(**_json(configs / f"{family}_unet.json"))
        vae_cfg = _json(configs / "sdxl_vae.json")
        if family == "sd15":
            vae_cfg.update(scaling_factor=0.18215, sample_size=512)
        vae = AutoencoderKL(**vae_cfg)
        te = _clip(configs / "clip_l_text_encoder.json", tok, projection=False)
        te2 = _clip(configs / "clip_bigg_text_encoder.json", tok, projection=True) if family == "sdxl" else None
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tiny_clip_tokenizer(), unet=unet,
                                         scheduler=EulerDiscreteScheduler(**sched), add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=DDPMScheduler(**sched, clip_sample=False),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    if family == "sdxl":
        fix = AutoencoderKL(**{**vae_cfg, "force_upcast": False})
        fix.load_state_dict(vae.state_dict())
        fix.to(torch.float16).save_pretrained(Path(f"{folder}-vae-fp16-fix"))


def build_llama(folder: Path, configs: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dashdiff.testing import tiny_llama_tokenizer

    tok = tiny_llama_tokenizer()
    cfg = LlamaConfig(**_json(configs / "llama_7b.json"), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def model_paths(args) -> dict[str, str]:
    if args.tiny:
        from dashdiff.testing import resolve_model

        sdxl = resolve_model("tiny-sdxl")
        return {"sd15": resolve_model("tiny-sd"), "sdxl": sdxl, "sdxl_vae_fix": str(Path(sdxl) / "vae"),
                "llama7b": resolve_model("tiny-llama")}
    root = Path(args.models)
    paths = {"sd15": root / "sd15", "sdxl": root / "sdxl", "sdxl_vae_fix": root / "sdxl-vae-fp16-fix",
             "llama7b": root / "llama7b"}
    need = {"sd": ["sd15"], "sdxl": ["sdxl"], "sdxl_recipe": ["sdxl"], "llama": ["llama7b"], "ddp": ["sd15", "llama7b"]}
    for name in sorted({n for g in args.groups for n in need[g]}):
        if not (paths[name] / ("model_index.json" if name != "llama7b" else "config.json")).exists():
            t0 = time.perf_counter()
            tmp = Path(f"{paths[name]}.tmp")
            (build_llama(tmp, Path(args.configs)) if name == "llama7b"
             else build_sd(tmp, Path(args.configs), name))
            if name == "sdxl":
                Path(f"{tmp}-vae-fp16-fix").rename(paths["sdxl_vae_fix"])
            tmp.rename(paths[name])
            print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Result:
    case: str
    status: str = "ok"
    wall_s: float = 0.0
    steps_per_s: Optional[float] = None
    peak_gib: Optional[float] = None
    launch_s: Optional[float] = None
    note: str = ""
    log: list[str] = field(default_factory=list)


def _visible_gpus() -> list[str]:
    """``-i ID,...`` for nvidia-smi when ``CUDA_VISIBLE_DEVICES`` restricts this process's GPUs."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return ["-i", ids] if ids else []


class GpuMemory:
    """Peak used memory over this process's GPUs while a case runs (``nvidia-smi``, polled every 0.2 s):
    the cases run one after another, so the device-level peak is the case's. nvidia-smi ignores
    ``CUDA_VISIBLE_DEVICES``, so its ids are passed on (two suites may share a host, one GPU each)."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._ok = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 if _has_smi() else False
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  *_visible_gpus()], capture_output=True, text=True).stdout.split()
            if out:
                self.peak_mib = max(self.peak_mib, max(float(v) for v in out))

    def __enter__(self) -> "GpuMemory":
        if self._ok:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ok:
            self._thread.join()

    @property
    def gib(self) -> Optional[float]:
        return self.peak_mib / 1024 if self._ok else None


def _has_smi() -> bool:
    from shutil import which

    return which("nvidia-smi") is not None


class Suite:
    def __init__(self, args, paths: dict[str, str]) -> None:
        self.args, self.paths = args, paths
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[Result] = []
        self.tiny = args.tiny

    def launch_cmd(self, script: str, precision: str, gpus: int = 1) -> list[str]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
               "--num_processes", str(gpus), "--mixed_precision", "no" if self.tiny else precision]
        if gpus > 1:
            cmd.append("--multi_gpu")
        elif self.tiny:
            cmd.append("--cpu")
        return cmd + [str(ROOT / "train" / script)]

    def run(self, case: str, cmd: list[str], out_dir: Optional[Path] = None,
            kill_when: Optional[Path] = None) -> Result:
        """Run one command; ``kill_when``: SIGKILL the whole process group once that path exists."""
        res = Result(case)
        log = self.work / f"{case}.log"
        t0 = time.perf_counter()
        with GpuMemory() as mem, open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
            while proc.poll() is None:
                if kill_when is not None and kill_when.exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    res.note = f"killed after {kill_when.parent.name}"
                    break
                time.sleep(0.1)
        res.wall_s = time.perf_counter() - t0
        res.peak_gib = mem.gib
        killed = kill_when is not None and res.note.startswith("killed")
        if proc.returncode != 0 and not killed:
            res.status = f"FAIL rc={proc.returncode}"
            res.log = log.read_text().splitlines()[-25:]
        elif kill_when is not None and not killed:
            res.status = "FAIL: ended before the kill point"
        if out_dir is not None and not killed and res.status == "ok":
            self._read_record(res, out_dir)
        self.results.append(res)
        if self.args.table:  # the table so far: a call cut off by its time limit still reports
            Path(self.args.table).write_text(self.table())
        print(f"[{case}] {res.status} {res.wall_s:.0f} s {res.note}", flush=True)
        for line in res.log:
            print(f"    {line}", flush=True)
        return res

    @staticmethod
    def _read_record(res: Result, out_dir: Path) -> None:
        """Steps/s and launch seconds from the run record and step log (the two scripts' records)."""
        rec = json.loads((out_dir / "dashdiff_run.json").read_text())
        if rec.get("status") != "done":
            res.status = f"FAIL: record says {rec.get('status')}"
        results, timings = rec.get("results") or {}, rec.get("timings") or {}
        loop = rec.get("train_loop") or {}  # DreamBooth: the final phase's training loop
        steps = loop.get("steps") or results.get("train_steps")
        seconds = loop.get("seconds") or timings.get("train_s")
        if steps and seconds:
            res.steps_per_s = steps / seconds
        launch = rec.get("dash_launch")
        if launch:
            res.launch_s = launch.get("seconds")
        elif (out_dir / "dashdiff_steps.jsonl").exists():
            for line in (out_dir / "dashdiff_steps.jsonl").read_text().splitlines():
                if '"dash_launch"' in line:
                    res.launch_s = json.loads(line).get("seconds")

    def check(self, res: Result, ok: bool, what: str) -> None:
        if res.status == "ok" and not ok:
            res.status = f"FAIL: {what}"
            print(f"[{res.case}] FAIL: {what}", flush=True)

    # ------------------------------------------------------------------ DreamBooth
    def db_args(self, family: str, out: Path, method: str, extra: list[str]) -> list[str]:
        res = "64" if self.tiny else ("1024" if family == "sdxl" else "512")
        return ["--pretrained_model_name_or_path", self.paths[family], "--instance_data_dir", str(SUBJECT),
                "--instance_prompt", "a photo of sks toy", "--method", method, "--rank", "4", "--resolution", res,
                "--train_batch_size", "1", "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none",
                "--validation_prompt", "a photo of sks toy on the beach", "--num_validation_images", "1",
                "--num_inference_steps", "4", "--output_dir", str(out), *extra]

    def dreambooth(self, case: str, family: str, method: str, precision: str, extra: list[str],
                   gpus: int = 1) -> Result:
        out = self.work / case
        cmd = self.launch_cmd("dreambooth_dash.py", precision, gpus) + self.db_args(family, out, method, extra)
        res = self.run(case, cmd, out)
        if res.status == "ok":
            self.check(res, (out / "pytorch_lora_weights.safetensors").exists(), "no LoRA export")
            self.check(res, any(out.glob("validation_*.png")), "no validation image")
            if "--output_kohya_format" in extra:
                self.check(res, (out / "pytorch_lora_weights_kohya.safetensors").exists(), "no kohya export")
        return res

    def killed_and_resumed(self, case: str, family: str, method: str, precision: str, extra: list[str],
                           kill_after: str, reference: Optional[Path] = None) -> None:
        """Kill once ``kill_after`` is complete, resume with ``latest``, compare the step log with
        ``reference``'s (an uninterrupted run of the same arguments), if given."""
        out = self.work / case
        args = self.db_args(family, out, method, extra)
        cmd = self.launch_cmd("dreambooth_dash.py", precision)
        marker = out / kill_after / "dashdiff_checkpoint.json"
        first = self.run(f"{case}-killed", cmd + args, kill_when=marker)
        if first.status != "ok":
            return
        res = self.run(f"{case}-resumed", cmd + args + ["--resume_from_checkpoint", "latest"], out)
        if res.status != "ok":
            return
        record = json.loads((out / "dashdiff_run.json").read_text())
        self.check(res, bool(record.get("resumed_from")), "the record does not say it resumed")
        if reference is not None and (reference / "dashdiff_steps.jsonl").exists():
            mine = _losses(out / "dashdiff_steps.jsonl")
            ref = _losses(reference / "dashdiff_steps.jsonl")
            common = sorted(set(mine) & set(ref))
            diff = max((abs(mine[k] - ref[k]) for k in common), default=float("nan"))
            res.note = f"resumed from {record.get('resumed_from')}; max |Δloss| vs uninterrupted {diff:.2e} over {len(common)} steps"
            self.check(res, len(common) == len(ref), "step logs cover different steps")

    # ------------------------------------------------------------------ groups
    def group_sdxl(self) -> None:
        kohya = ["--output_kohya_format"]
        short = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
        self.dreambooth("sdxl-lora-bf16", "sdxl", "lora", "bf16", short + kohya)
        self.dreambooth("sdxl-dash-bf16", "sdxl", "dash", "bf16", short + kohya + ["--dash_warmup_steps", "2"])
        # The same run killed after its first checkpoint (before the launch at step 2), then resumed.
        self.killed_and_resumed("sdxl-dash-bf16-resume", "sdxl", "dash", "bf16",
                                ["--max_train_steps", "4", "--checkpointing_steps", "1", "--dash_warmup_steps", "2"]
                                + kohya, kill_after="checkpoint-1", reference=self.work / "sdxl-dash-bf16")
        self.stock_reload("sdxl-stock-reload", "sdxl", ["sdxl-lora-bf16", "sdxl-dash-bf16", "sdxl-dash-bf16-resume"])

    def group_sdxl_recipe(self) -> None:
        kohya = ["--output_kohya_format"]
        self.dreambooth("sdxl-autolora-bf16", "sdxl", "autolora", "bf16",
                        ["--max_train_steps", "2", "--autolora_search_steps", "2", "--checkpointing_steps", "1"] + kohya)
        # The published SDXL recipe: fp16, fp16-fix VAE, accumulation 4; plus text encoders, prior
        # preservation with class images generated by the base model, cached latents.
        self.dreambooth("sdxl-dash-fp16-recipe", "sdxl", "dash", "fp16", [
            "--pretrained_vae_model_name_or_path", self.paths["sdxl_vae_fix"], "--gradient_accumulation_steps", "4",
            "--max_train_steps", "3", "--dash_warmup_steps", "2", "--train_text_encoder", "--with_prior_preservation",
            "--class_prompt", "a photo of toy", "--class_data_dir", str(self.work / "sdxl-class"),
            "--num_class_images", "2", "--sample_batch_size", "2", "--cache_latents", "--checkpointing_steps", "10"]
            + kohya)
        self.stock_reload("sdxl-recipe-stock-reload", "sdxl", ["sdxl-autolora-bf16", "sdxl-dash-fp16-recipe"])

    def group_sd(self) -> None:
        self.dreambooth("sd15-lora-fp16", "sd15", "lora", "fp16", ["--max_train_steps", "3", "--output_kohya_format"])
        auto = ["--max_train_steps", "2", "--autolora_search_steps", "4", "--checkpointing_steps", "1"]
        self.dreambooth("sd15-autolora-fp16", "sd15", "autolora", "fp16", auto)
        self.killed_and_resumed("sd15-autolora-fp16-resume", "sd15", "autolora", "fp16", auto,
                                kill_after="checkpoint-search-2", reference=self.work / "sd15-autolora-fp16")
        self.stock_reload("sd15-stock-reload", "sd15", ["sd15-lora-fp16", "sd15-autolora-fp16",
                                                         "sd15-autolora-fp16-resume"])

    def commonsense(self, case: str, method: str, gpus: int = 1, extra: Optional[list[str]] = None) -> Result:
        out = self.work / case
        r = "4" if self.tiny else "32"
        cmd = self.launch_cmd("commonsense_dash.py", "bf16", gpus) + [
            "--base_model", self.paths["llama7b"], "--data_path", str(COMMONSENSE / "train.json"),
            "--output_dir", str(out), "--adapter_name", method, "--lora_r", r, "--lora_alpha", str(2 * int(r)),
            "--batch_size", str(4 * gpus), "--micro_batch_size", "2", "--num_epochs", "1", "--cutoff_len", "256",
            "--val_set_size", "4", "--eval_step", "4", "--save_step", "2", "--learning_rate", "2e-4",
            "--warmup_steps", "1", "--dash_warmup_steps", "1", "--dash_prefetch_spectra", *(extra or [])]
        return self.run(case, cmd, out)

    def group_llama(self) -> None:
        res = self.commonsense("llama7b-dash-bf16", "dash")
        if res.status != "ok":
            return
        out = self.work / "llama7b-dash-bf16"
        ev = self.work / "llama7b-dash-eval"
        cmd = [sys.executable, str(ROOT / "train" / "commonsense_eval.py"), "--dataset", "all",
               "--data_dir", str(COMMONSENSE), "--base_model", self.paths["llama7b"], "--lora_weights", str(out),
               "--batch_size", "8", "--output_dir", str(ev), "--no_progress"]
        if not self.tiny:
            cmd += ["--dtype", "bfloat16", "--device", "cuda"]
        eres = self.run("llama7b-eval-all", cmd)
        if eres.status == "ok":
            results = json.loads((ev / "results.json").read_text()) if (ev / "results.json").exists() else {}
            text = json.dumps(results)
            missing = [d.name for d in COMMONSENSE.iterdir() if d.is_dir() and d.name not in text]
            self.check(eres, bool(results) and not missing, f"results.json lacks {missing or 'everything'}")
            eres.note = f"{8 - len(missing)} data sets evaluated"
        self.stock_reload("llama7b-stock-reload", "llama7b", ["llama7b-dash-bf16"])

    def group_ddp(self) -> None:
        gpus = self.args.gpus
        self.dreambooth(f"sd15-dash-bf16-ddp{gpus}", "sd15", "dash", "bf16",
                        ["--max_train_steps", "4", "--dash_warmup_steps", "2", "--checkpointing_steps", "2"], gpus)
        self.dreambooth(f"sd15-autolora-bf16-ddp{gpus}", "sd15", "autolora", "bf16",
                        ["--max_train_steps", "2", "--autolora_search_steps", "2", "--train_batch_size", "2"], gpus)
        self.commonsense(f"llama7b-dash-bf16-ddp{gpus}", "dash", gpus)

    # ------------------------------------------------------------------ stock reload
    def stock_reload(self, case: str, family: str, runs: list[str]) -> None:
        tasks = []
        for run in runs:
            out = self.work / run
            if not (out / "dashdiff_run.json").exists():
                continue
            if family == "llama7b":
                tasks.append({"id": run, "kind": "peft", "base": self.paths["llama7b"], "adapter": str(out)})
                continue
            tasks.append({"id": run, "kind": "pipeline_lora", "base": self.paths[family], "lora": str(out)})
            kohya = out / "pytorch_lora_weights_kohya.safetensors"
            if kohya.exists():
                tasks.append({"id": f"{run}-kohya", "kind": "pipeline_lora", "base": self.paths[family],
                              "lora": str(out), "weight_name": kohya.name})
        job = self.work / f"{case}.json"
        job.write_text(json.dumps({"tasks": tasks, "resolution": 64 if self.tiny else 512}))
        res = self.run(case, [sys.executable, str(ROOT / "bench" / "stock_reload.py"), str(job)])
        res.note = f"{len(tasks)} exports"

    # ------------------------------------------------------------------ table
    def table(self) -> str:
        import torch  # the suite process never touches CUDA itself: its memory would count in the peaks

        names = (subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", *_visible_gpus()],
                                capture_output=True, text=True).stdout.splitlines() if _has_smi() else [])
        dev = f"{names[0]} x{len(names)}" if names else "CPU"
        rows = [f"GPU end-to-end suite, {time.strftime('%Y-%m-%d')}, {dev}; "
                f"torch {torch.__version__}; groups {','.join(self.args.groups)}\n",
                "| run | status | wall (s) | steps/s | peak GPU memory (GiB) | launch (s) | note |",
                "|---|---|---|---|---|---|---|"]
        f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        for r in self.results:
            rows.append(f"| {r.case} | {r.status} | {r.wall_s:.0f} | {f(r.steps_per_s, 2)} | {f(r.peak_gib, 1)} | "
                        f"{f(r.launch_s, 2)} | {r.note} |")
        return "\n".join(rows) + "\n"


def _losses(path: Path) -> dict[tuple, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                out[(rec.get("phase"), rec["step"])] = rec["loss"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="sdxl,sd,llama", help="comma list of: sdxl, sdxl_recipe, sd, llama, ddp")
    p.add_argument("--models", default=".gpu/models", help="where the random-weight models are built (once)")
    p.add_argument("--configs", default=str(ROOT.parent / "shared" / "configs"))
    p.add_argument("--work", default="/tmp/dashdiff-e2e", help="run folders and logs")
    p.add_argument("--gpus", type=int, default=2, help="processes for the ddp group")
    p.add_argument("--tiny", action="store_true", help="dry run of the suite on the tiny models, on CPU")
    p.add_argument("--table", default=None, help="also write the table to this file")
    p.add_argument("--build_only", action="store_true")
    args = p.parse_args(argv)
    args.groups = [g for g in args.groups.split(",") if g]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.path.insert(0, str(ROOT))
    paths = model_paths(args)
    if args.build_only:
        return 0
    suite = Suite(args, paths)
    for g in args.groups:
        getattr(suite, f"group_{g}")()
    table = suite.table()
    print(table, flush=True)
    if args.table:
        Path(args.table).write_text(table)
    return 0 if all(r.status == "ok" for r in suite.results) else 1


if __name__ == "__main__":
    sys.exit(main())
