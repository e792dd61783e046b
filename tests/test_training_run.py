"""dashdiff/training/run.py: the run lifecycle both training scripts share (issue 15).
The scripts' end-to-end files exercise it in real runs; these are its rules on their own."""

import peft
import pytest
import torch
from torch import nn

import dashdiff
from dashdiff import training as T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 16)
        self.o_proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def dash_model(warmup: int = 1) -> nn.Module:
    torch.manual_seed(0)
    cfg = dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], dash_warmup_steps=warmup,
                                  dash_directions=2, init_lora_weights="gaussian")
    return peft.get_peft_model(Net(), cfg)


def test_skipped_steps_do_not_count_and_the_launch_reports_its_directions():
    model = dash_model(warmup=2)
    assert T.dash_optimizer_step(model, 1, skipped=True) is None  # the fp16 scaler skipped it
    assert T.dash_optimizer_step(model, 2, skipped=False) is None
    report = T.dash_optimizer_step(model, 3, skipped=False)
    assert report["step"] == 3 and report["layers"] == 2 and report["num_processes"] == 1
    assert report["direction_digests"] == [T.directions_digest(model)]
    assert T.dash_optimizer_step(model, 4, skipped=False) is None  # launched once


def test_directions_that_differ_between_processes_stop_the_run(monkeypatch):
    import accelerate.state
    import accelerate.utils

    class TwoProcesses:
        num_processes = 2

    monkeypatch.setattr(accelerate.state, "PartialState", TwoProcesses)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + ["0123456789abcdef"])
    with pytest.raises(RuntimeError, match="differs between processes"):
        T.dash_optimizer_step(dash_model(), 1, skipped=False)


def test_step_log_positions_of_both_scripts_rows():
    assert T.log_position({"phase": "search", "step": 3}) == (0, 3)  # commonsense
    assert T.log_position({"phase": "pre-launch", "phase_kind": "train", "step": 2}) == (1, 2)  # DreamBooth
    assert T.log_position({"event": "eval", "step": 1}) == (2, 1)  # no phase: after everything


# --------------------------------------------------------------------------- the Run lifecycle on its own


import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402


class Accelerator:
    """What Run asks of accelerate's Accelerator, recorded: one process (or another rank), save / load state."""

    def __init__(self, main=True, processes=1, index=0, mixed_precision="no"):
        self.is_main_process, self.num_processes, self.process_index = main, processes, index
        self.mixed_precision = mixed_precision
        self.loaded, self.reduced = [], []

    def reduce(self, tensor, reduction):
        self.reduced.append(reduction)
        return tensor

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "optimizer.bin").write_bytes(b"o" * 7)
        (Path(folder) / T.ADAPTER_STATE).write_bytes(b"a" * 5)

    def load_state(self, folder):
        self.loaded.append(folder)


def _run(tmp_path, acc=None, **kw) -> T.Run:
    out = tmp_path / "out"
    return T.Run(accelerator=acc or Accelerator(), out=out, fingerprint="fp", method=kw.pop("method", "dash"),
                 log=T.StepLog(out / T.STEP_LOG), record={"status": "running", "fingerprint": "fp"}, **kw)


ROWS = [{"phase": "search", "step": 1}, {"phase": "search", "step": 2}, {"phase": "train", "step": 1},
        {"phase": "pre-launch", "phase_kind": "train", "step": 2}, {"phase": "train", "step": 3},
        {"event": "eval", "step": 0}]


def _write_rows(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))


def test_commit_of_a_fresh_run_writes_the_record_once(tmp_path):
    run = _run(tmp_path)
    _write_rows(run.log.path)  # a fresh start into a folder with an old log: kept as it is (no resume, no restart)
    run.commit()
    assert run.committed and json.loads((run.out / T.RUN_RECORD).read_text()) == {"status": "running", "fingerprint": "fp"}
    assert T.StepLog.read(run.log.path) == ROWS
    run.record["status"] = "changed"
    run.commit()  # only the first call does anything
    assert json.loads((run.out / T.RUN_RECORD).read_text())["status"] == "running"


def test_commit_cuts_the_log_back_to_the_resume_point(tmp_path):
    ckpt = tmp_path / "out" / "checkpoint-2"
    run = _run(tmp_path, resume=T.Checkpoint(ckpt, "train", 2))
    _write_rows(run.log.path)
    run.commit()
    assert T.StepLog.read(run.log.path) == ROWS[:4] + [{"event": "resume", "path": str(ckpt), "phase": "train", "step": 2}]

    quiet = _run(tmp_path / "q", resume=T.Checkpoint(tmp_path / "q" / "checkpoint-search-1", "search", 1),
                 log_events=False)
    _write_rows(quiet.log.path)
    quiet.commit()
    assert T.StepLog.read(quiet.log.path) == ROWS[:1]  # search step 1 only; no event row

    restart = _run(tmp_path / "r", restart=True)
    _write_rows(restart.log.path)
    restart.commit()
    assert T.StepLog.read(restart.log.path) == []


def test_commit_on_another_process_writes_no_record(tmp_path):
    run = _run(tmp_path, Accelerator(main=False, processes=2, index=1))
    run.commit()
    assert run.committed and not run.out.exists()
    assert (run.world, run.rank, run.is_main) == (2, 1, False)


def test_check_loss_reduces_and_names_the_last_checkpoint_and_the_advice(tmp_path):
    acc = Accelerator()
    run = _run(tmp_path, acc, advice=lambda last: f"resume from {last}")
    assert run.check_loss(torch.tensor(2.5), 0, "train").item() == 2.5 and acc.reduced == ["mean"]
    run.last_checkpoint = tmp_path / "checkpoint-4"
    with pytest.raises(T.NonFiniteLossError) as e:
        run.check_loss(torch.tensor(math.nan), 5, "search")
    assert str(e.value) == (f"loss is nan at search step 6: training stopped before this step changed any weight; "
                            f"the last good checkpoint is {tmp_path / 'checkpoint-4'}; resume from "
                            f"{tmp_path / 'checkpoint-4'}. No final weights were written.")


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def test_save_and_load_a_checkpoint_with_extra_state(tmp_path):
    run = _run(tmp_path, total_limit=2)
    run.commit()
    run.ranks, run.alphas = {"q": 2}, {"q": [0.5, 0.5]}
    paths = [run.save_checkpoint("train", step, {"epoch": 1}, {"counter": Counter(step)}) for step in (1, 2, 3)]
    assert [p.name for p in paths] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in run.out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert run.last_checkpoint == paths[-1]
    info = T.read_checkpoint_info(paths[-1])
    assert {k: info[k] for k in ("method", "fingerprint", "num_processes", "autolora_ranks", "autolora_alphas", "epoch",
                                 "phase", "step")} == {
        "method": "dash", "fingerprint": "fp", "num_processes": 1, "autolora_ranks": {"q": 2},
        "autolora_alphas": {"q": [0.5, 0.5]}, "epoch": 1, "phase": "train", "step": 3}
    assert set(info["files"]) == {"optimizer.bin", T.ADAPTER_STATE, T.EXTRA_STATE}
    assert torch.load(paths[-1] / T.EXTRA_STATE, weights_only=True) == {"counter": {"n": torch.tensor(3)}}
    events = [r for r in T.StepLog.read(run.log.path) if r.get("event") == "checkpoint"]
    assert events == [{"event": "checkpoint", "phase": "train", "step": s, "path": f"checkpoint-{s}"} for s in (1, 2, 3)]

    search = _run(tmp_path / "s", log_events=False)
    path = search.save_checkpoint("search", 4)
    assert path.name == "checkpoint-search-4" and not (path / T.EXTRA_STATE).exists()
    info = T.read_checkpoint_info(path)
    assert "autolora_ranks" not in info and "autolora_alphas" not in info and not search.log.path.exists()

    acc = Accelerator()
    fresh = _run(tmp_path, acc)  # the same folder: resume from checkpoint-3
    counter = Counter()
    fresh.load_checkpoint(T.Checkpoint(paths[-1], "train", 3), {"counter": counter})
    assert acc.loaded == [str(paths[-1])] and counter.n == 3
    assert fresh.last_checkpoint == paths[-1] and fresh.committed
    other = _run(tmp_path / "n", Accelerator())
    other.load_checkpoint(T.Checkpoint(paths[-1], "train", 3))  # no stateful objects: extra_state.pt not read
    assert other.committed and other.last_checkpoint == paths[-1]


def test_recorded_ranks_and_the_switch_to_the_retrain(tmp_path):
    run = _run(tmp_path, method="autolora")
    assert run.recorded_ranks() is None  # a fresh run
    ckpt = tmp_path / "checkpoint-search-3"
    run.resume = T.Checkpoint(ckpt, "search", 3)
    assert run.recorded_ranks() is None  # the search is not over
    for key in ("autolora_ranks", "ranks"):  # "ranks": commonsense checkpoints before 0.2
        folder = tmp_path / key / "checkpoint-5"
        folder.mkdir(parents=True)
        (folder / T.ADAPTER_STATE).write_bytes(b"")
        (folder / "optimizer.bin").write_bytes(b"")
        T.write_checkpoint_info(folder, {key: {"a": 2.0, "b": "3"}, "autolora_alphas": {"a": [1.0]}})
        run = _run(tmp_path, method="autolora", resume=T.Checkpoint(folder, "train", 5))
        assert run.recorded_ranks() == {"a": 2, "b": 3} and run.alphas == {"a": [1.0]}
    T.write_checkpoint_info(folder, {"step": 5})
    run = _run(tmp_path, method="autolora", resume=T.Checkpoint(folder, "train", 5))
    assert run.recorded_ranks() is None and run.alphas == {}

    run = _run(tmp_path, method="autolora", resume=T.Checkpoint(ckpt, "search", 3))
    run.start_retrain({"a": 1})
    assert run.ranks == {"a": 1} and run.results["autolora_ranks"] == {"a": 1} and run.resume is None
    train = T.Checkpoint(folder, "train", 5)
    run = _run(tmp_path, method="autolora", resume=train)
    run.start_retrain({"a": 1})
    assert run.resume is train  # a retrain checkpoint is the retrain's own resume point


def test_after_optimizer_step_counts_only_real_steps_of_lora_dash(tmp_path):
    model = dash_model(warmup=2)
    layer = model.base_model.model.q_proj
    lora = _run(tmp_path / "l", method="lora")
    assert lora.after_optimizer_step(model, 1, skipped=False) is None
    assert int(layer.lora_dash_step["default"]) == 0  # another method's run never advances LoRA-Dash

    run = _run(tmp_path)
    assert run.after_optimizer_step(model, 1, skipped=True) is None  # the fp16 scaler skipped it
    assert run.after_optimizer_step(model, 2, skipped=False) is None and run.launch is None
    report = run.after_optimizer_step(model, 3, skipped=False, phase="dash")
    assert report is run.launch and report["step"] == 3 and report["layers"] == 2
    events = [r for r in T.StepLog.read(run.log.path) if r.get("event") == "dash_launch"]
    assert events == [{"event": "dash_launch", "phase": "dash", **json.loads(json.dumps(report))}]
    assert run.after_optimizer_step(model, 4, skipped=False) is None and run.launch is report

    quiet = _run(tmp_path / "q", log_events=False)
    assert quiet.after_optimizer_step(dash_model(warmup=1), 1, skipped=False)["step"] == 1
    assert not quiet.log.path.exists()


def test_stop_records_why(tmp_path):
    run = _run(tmp_path)
    run.commit()
    run.last_checkpoint = tmp_path / "checkpoint-2"
    run.record["extra"] = 1  # the record in memory is what is written once committed
    run.stop(T.NonFiniteLossError("boom"))
    rec = T.read_run_record(run.out)
    assert rec == {"status": "stopped: non-finite loss", "fingerprint": "fp", "extra": 1, "error": "boom",
                   "last_checkpoint": str(tmp_path / "checkpoint-2")}
    run.stop(T.CheckpointWriteError("full"))
    assert T.read_run_record(run.out)["status"] == "stopped: checkpoint write failed"
    run.stop(KeyError("x"))
    assert T.read_run_record(run.out)["status"] == "stopped: KeyError"

    early = _run(tmp_path / "e")  # not committed: the record on disk is updated, not the one in memory
    early.out.mkdir(parents=True)
    T.write_run_record(early.out, {"status": "failed before", "mine": True})
    early.stop(ValueError("v"))
    assert T.read_run_record(early.out) == {"status": "stopped: ValueError", "mine": True, "error": "v",
                                            "last_checkpoint": None}
    other = _run(tmp_path / "o", Accelerator(main=False, processes=2, index=1))
    other.stop(ValueError("v"))
    assert not other.out.exists()  # only the main process writes the record


def test_small_helpers():
    assert T.mixed_precision_dtype(SimpleNamespace(mixed_precision="fp16")) is torch.float16
    assert T.mixed_precision_dtype(SimpleNamespace(mixed_precision="bf16")) is torch.bfloat16
    assert T.mixed_precision_dtype(SimpleNamespace(mixed_precision="no")) is torch.float32
    (handler,) = T.ddp_kwargs_handlers()
    assert handler.broadcast_buffers is False and handler.to_kwargs() == {"broadcast_buffers": False}

    class Acc:
        def prepare_optimizer(self, opt):
            return ("prepared", opt)

    beta = torch.zeros(3, requires_grad=True)
    tag, opt = T.prepared_beta_optimizer(Acc(), [beta], 0.25)
    assert tag == "prepared" and isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 0.25 and opt.defaults["betas"] == (0.5, 0.999) and opt.param_groups[0]["params"] == [beta]
    assert T.log_position({"phase": "train"}) == (1, 0)  # a row without a step sorts first in its phase


def test_directions_digest_changes_with_any_direction_or_name():
    a, b = dash_model(), dash_model()
    dashdiff.launch_dash(a)
    dashdiff.launch_dash(b)
    d = T.directions_digest(a)
    assert len(d) == 16 and d == T.directions_digest(b)
    with torch.no_grad():
        b.base_model.model.o_proj.lora_dash_V["default"][0, 0] += 1e-6  # V_sᵀ, last layer (float32: 1e-6 is ~100 ulps)
    assert T.directions_digest(b) != d
    c = dash_model()
    dashdiff.launch_dash(c)
    with torch.no_grad():
        c.base_model.model.q_proj.lora_dash_U["default"][1, 1] *= -1
    assert T.directions_digest(c) != d
    import hashlib  # the digest as documented: names, then U_s and V_sᵀ as float64 bytes, per layer

    h = hashlib.sha256()
    for name in ("q_proj", "o_proj"):
        layer = a.base_model.model.get_submodule(name)
        h.update(name.encode())
        for t in (layer.lora_dash_U["default"], layer.lora_dash_V["default"]):
            h.update(t.detach().double().contiguous().numpy().tobytes())
    assert d == h.hexdigest()[:16]


def _two_adapter_model():
    """LoRA-Dash adapters "first" (warm-up 1) and "second" (warm-up 3) and a plain LoRA on the same layers."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), dashdiff.LoraDashConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], dash_warmup_steps=1, dash_directions=2,
        init_lora_weights="gaussian"), adapter_name="first")
    model.add_adapter("second", dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                                   dash_warmup_steps=3, dash_directions=2, init_lora_weights="gaussian"))
    model.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    return model


def test_the_launch_hook_of_one_named_adapter(tmp_path):
    """``adapter_name``: only that adapter advances and launches, and the report counts its layers only; without
    the cross-process check one process reports itself; the report has exactly its documented keys."""
    model = _two_adapter_model()
    report = T.dash_optimizer_step(model, 1, skipped=False, adapter_name="first", check_processes=False)
    assert sorted(report) == ["direction_digests", "layers", "num_processes", "seconds", "step"]
    assert report["layers"] == 2 and report["num_processes"] == 1 and report["step"] == 1
    assert isinstance(report["seconds"], float) and report["seconds"] > 0
    q = model.base_model.model.q_proj
    assert int(q.lora_dash_step["first"]) == 1 and int(q.lora_dash_step["second"]) == 0  # not advanced
    # the digest reads LoRA-Dash adapters only: the plain adapter on the same layers has no U_s / V_s
    assert report["direction_digests"] == [T.directions_digest(model)]
    # no adapter named (the scripts' call): the report counts the LoRA-Dash layers, not the plain adapter's too
    single = dash_model(warmup=1)
    single.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    assert T.dash_optimizer_step(single, 1, skipped=False)["layers"] == 2
    run = _run(tmp_path)
    assert run.after_optimizer_step(dash_model(warmup=1), 1, skipped=False)["step"] == 1
    assert [r["phase"] for r in T.StepLog.read(run.log.path) if r.get("event") == "dash_launch"] == ["train"]


def test_save_messages_name_the_scripts_flags_and_the_saved_folder(tmp_path, caplog):
    import logging

    run = _run(tmp_path, flags=T.FlagNames(resume="--resume_from_checkpoint"))
    with caplog.at_level(logging.INFO, logger="dashdiff.training"):
        path = run.save_checkpoint("train", 1)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved")] == [f"saved {path}"]

    class Full(Accelerator):
        def save_state(self, folder):
            raise OSError(28, "No space left on device")

    full = _run(tmp_path / "full", Full(), flags=T.FlagNames(resume="--resume_from_checkpoint"))
    with pytest.raises(T.CheckpointWriteError) as e:
        full.save_checkpoint("train", 2)
    assert str(e.value).endswith("Free some space, then resume with --resume_from_checkpoint latest.")


def test_a_crafted_extra_state_is_refused_not_run(tmp_path, monkeypatch):
    """``extra_state.pt`` is loaded with ``weights_only=True``: a pickle that would run code is refused."""
    import pickle

    class Crafted:
        def __reduce__(self):
            return (exec, ("import os; os.environ['DASHDIFF_TEST_PWNED'] = '1'",))

    monkeypatch.delenv("DASHDIFF_TEST_PWNED", raising=False)
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save({"counter": Crafted()}, folder / T.EXTRA_STATE)
    with pytest.raises(pickle.UnpicklingError):
        _run(tmp_path).load_checkpoint(T.Checkpoint(folder, "train", 1), {"counter": Counter()})
    assert "DASHDIFF_TEST_PWNED" not in __import__("os").environ
