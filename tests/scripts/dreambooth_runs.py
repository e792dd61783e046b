"""Run several DreamBooth trainings in ONE process (one ~9 s import under ``accelerate launch``).

Usage: ``dreambooth_runs.py [--dump DIR] ARGS... [--next ARGS...]...``: each group of arguments is
one ``train/dreambooth_dash.py`` run. With ``--dump DIR``, every process writes, at each LoRA-Dash
launch, AutoLoRA search end and training end, its adapter tensors (δ, U_s, V_s, β, A, B) to
``DIR/<run>-<event>-rank<i>.safetensors``, so a test can compare the processes, and the
``broadcast_buffers`` setting of every DDP wrapper it made to ``DIR/ddp-rank<i>.json``.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("dreambooth_dash", ROOT / "train" / "dreambooth_dash.py")
db = importlib.util.module_from_spec(spec)
sys.modules["dreambooth_dash"] = db  # dataclasses look their module up there
spec.loader.exec_module(db)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def dumper(folder: Path, run: int):
    def on_event(name: str, info: dict) -> None:
        from accelerate.state import PartialState

        host = info["host"]
        tensors = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(host, comp, None)
            if model is None:
                continue
            for key, value in model.state_dict().items():
                if any(k in key for k in ("lora_dash", "lora_autolora_beta", "lora_A", "lora_B")):
                    tensors[f"{comp}.{key}"] = value.detach().cpu().float().contiguous().clone()
        rank = PartialState().process_index
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / f"run{run}-{name}-rank{rank}.safetensors"))

    return on_event


def record_ddp(folder: Path) -> None:
    """Note ``broadcast_buffers`` of every DistributedDataParallel this process builds."""
    from accelerate.state import PartialState

    ddp = torch.nn.parallel.DistributedDataParallel
    real_init = ddp.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        path = folder / f"ddp-rank{PartialState().process_index}.json"
        seen = json.loads(path.read_text()) if path.exists() else []
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seen + [self.broadcast_buffers]))

    ddp.__init__ = init


def main(argv: list[str]) -> None:
    dump = None
    if argv[:1] == ["--dump"]:
        dump, argv = Path(argv[1]), argv[2:]
        record_ddp(dump)
    groups, cur = [], []
    for a in argv:
        if a == "--next":
            groups.append(cur)
            cur = []
        else:
            cur.append(a)
    groups.append(cur)
    # accelerator.end_training() destroys the process group at the end of each run; re-creating it
    # in the same processes races on the rendezvous store (seen to hang). Keep one group for all
    # the runs and destroy it once at the end.
    from accelerate.state import PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        for i, group in enumerate(groups):
            if i:
                reset_accelerate()
            torch.manual_seed(0)
            db.main(db.parse_args(group), on_event=dumper(dump, i) if dump else None)
    finally:
        PartialState.destroy_process_group = destroy
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
