"""Running scripts the way users do: ``accelerate launch``, with two real CPU processes where asked."""

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script(path, name: str | None = None, reuse: bool = False):
    """Import a script file (``train/x.py``, ``assets/pretrain/x.py``; relative to the repository or
    absolute) as module ``name`` (default: the file's stem), registered in ``sys.modules`` because
    dataclasses look their module up there. ``reuse``: return the module already imported under that
    name instead of executing the file again."""
    path = Path(path) if Path(path).is_absolute() else ROOT / path
    name = name or path.stem
    if reuse and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def one_torch_thread():
    """Torch on one thread inside: tiny models then compute what OMP_NUM_THREADS=1 subprocesses do."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state between in-process script runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def accelerate_launch(script: str, *args: str, processes: int = 1, timeout: int = 300,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``accelerate launch`` on ``script``; two processes use the only launch line that really
    starts two on CPU here (``ACCELERATE_USE_CPU=1 ... --multi_gpu``, see ECOSYSTEM.md)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    if processes > 1:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", _free_port()]
    else:
        cmd += ["--num_processes", "1", "--cpu"]
    # Two gloo processes on a loaded 2-core machine hung now and then at exit (about 1 run in 10 of
    # the AutoLoRA script under load): the DDP wrapper outlived the destroyed process group and a
    # rank stuck in its teardown. The test scripts now free the wrapper first (0 hangs in 30 loaded
    # runs, 2026-11-23); a hang is still retried once on a fresh port, a failure is not.
    attempts = 1 if processes == 1 else 2
    for attempt in range(attempts):
        if attempt:
            cmd[cmd.index("--main_process_port") + 1] = _free_port()
        try:
            proc = subprocess.run(cmd + [script, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                                  timeout=timeout if processes == 1 else min(timeout, 120))
            break
        except subprocess.TimeoutExpired:
            if attempt == attempts - 1:
                raise
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
