"""Checkpoints and output folders under faults (issue 13): a save killed at random points, a full
disk, a crafted pickle, a second run into the same folder, a stale lock, foreign files under
--overwrite_output_dir, refused resumes, a resume from the last checkpoint.

The DreamBooth script on tiny-sd, in-process through ``main(args)`` except the killed runs, which
are real subprocesses (3, plain ``python train/dreambooth_dash.py``: SIGKILL needs a process of its
own). The commonsense script's cases are in test_commonsense_train.py (they reuse its runs).
The checkpoint and lock rules on their own are in test_training_checkpoints.py and
test_training_folders.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dashdiff import safeio
from dashdiff import training as T
from launch_utils import ROOT, reset_accelerate

SUBJECT = str(ROOT / "assets" / "subject")
SCRIPT = ROOT / "train" / "dreambooth_dash.py"
# 5 images, batch 2: 3 optimizer steps per epoch; checkpoints at 2, 4 (mid-epoch), 6.
STEPS = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--lora_dropout", "0.1", "--random_flip",
         "--seed", "5"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def argv(out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", SUBJECT,
            "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", *extra]


def run(db, args: list[str]) -> dict:
    reset_accelerate()
    torch.manual_seed(0)
    try:
        return db.main(db.parse_args(args))
    finally:
        reset_accelerate()


def losses(folder: Path) -> dict[tuple[str, int], float]:
    return {(r["phase_kind"], r["step"]): r["loss"] for r in T.StepLog.read(folder / T.STEP_LOG)}


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (and its folders, as '<dir>')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_run(ref: Path, out: Path) -> None:
    """Every step's loss and the final full adapter state equal the uninterrupted run's."""
    want, got = losses(ref), losses(out)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-6, (key, got[key], want[key])
    a, b = load_file(ref / T.ADAPTER_STATE), load_file(out / T.ADAPTER_STATE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def reference(db, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one is compared with."""
    out = tmp_path_factory.mktemp("ref") / "out"
    record = run(db, argv(out, *STEPS))
    assert record["status"] == "done" and record["global_step"] == 6
    assert len(set(losses(out).values())) == 6
    return out


def craft_pickle(path: Path, marker: Path) -> None:
    """Replace ``path`` with a pickle that creates ``marker`` when unpickled by plain pickle."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Payload()}, path)


def fix_manifest(ckpt: Path) -> None:
    """An attacker edits the marker too, so that only the pickle check stands in the way."""
    info = json.loads((ckpt / T.CHECKPOINT_STATE).read_text())
    info["files"] = {k: (ckpt / k).stat().st_size for k in info["files"]}
    (ckpt / T.CHECKPOINT_STATE).write_text(json.dumps(info))


# =========================================================================== DreamBooth runs


def test_second_run_into_a_locked_folder_is_refused_and_changes_nothing(db, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / T.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                   "start": T._process_start(sleeper.pid)}))
        before = snapshot(out)
        with pytest.raises(T.TrainingError, match="in use by another run"):
            run(db, argv(out, *STEPS, "--overwrite_output_dir"))
        assert snapshot(out) == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(db, reference, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "out"
    real = safeio._save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's adapter state (the first is checkpoint-2's)
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as fh:  # half written, as a full disk leaves it
                fh.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safeio, "_save_file", full_disk)
    reset_accelerate()
    try:
        assert db.cli(argv(out, *STEPS, "--checkpoints_total_limit", "1")) == 1
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("dreambooth_dash.py: error: "), err
    assert "could not write checkpoint" in err[0] and "checkpoint-4: the disk is full" in err[0], err
    assert "earlier checkpoints are intact (checkpoint-2)" in err[0]
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and not any("checkpoint-4" in n for n in names), names  # no partial folder
    assert T.LOCK_FILE not in names  # released on the error
    record = T.read_run_record(out)
    assert record["status"] == "stopped: checkpoint write failed"
    monkeypatch.setattr(safeio, "_save_file", real)
    run(db, argv(out, *STEPS, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"))
    assert_same_run(reference, out)
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-6"]


def test_a_crafted_pickle_is_not_executed_and_the_refused_resume_changes_nothing(db, reference, tmp_path):
    for victim in ("optimizer.bin", "random_states_0.pkl"):
        out = tmp_path / victim
        shutil.copytree(reference, out)
        marker = tmp_path / f"pwned-{victim}"
        craft_pickle(out / "checkpoint-4" / victim, marker)
        fix_manifest(out / "checkpoint-4")
        before = snapshot(out)
        with pytest.raises(T.TrainingError, match=rf"checkpoint-4/{victim}: refused to load it.*nothing was executed"):
            run(db, argv(out, *STEPS, "--resume_from_checkpoint", "checkpoint-4"))
        assert not marker.exists()
        assert snapshot(out) == before  # step log not cut, record not flipped to running
    # the same, for a checkpoint whose save was cut short (a file missing): refused, nothing changed
    out = tmp_path / "incomplete"
    shutil.copytree(reference, out)
    (out / "checkpoint-4" / "scheduler.bin").unlink()
    before = snapshot(out)
    with pytest.raises(T.TrainingError, match="checkpoint-4 is not a complete dashdiff checkpoint: scheduler.bin is "
                                              "missing"):
        run(db, argv(out, *STEPS, "--resume_from_checkpoint", str(out / "checkpoint-4")))
    assert snapshot(out) == before
    # a resume that passes the checks but fails while loading (an adapter of another rank): the
    # step log and the record are only touched once the checkpoint has been loaded
    out = tmp_path / "other-rank"
    shutil.copytree(reference, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="shape"):
        run(db, argv(out, *STEPS, "--rank", "8", "--resume_from_checkpoint", "latest"))
    assert snapshot(out) == before


def test_resume_from_the_last_checkpoint_trains_nothing_more(db, reference, tmp_path):
    # step 6 ends an epoch (3 steps each); step 4 is mid-epoch, where a resume used to run step 5
    for ckpt, last in (("latest", 6), ("checkpoint-4", 4)):
        out = tmp_path / ckpt
        shutil.copytree(reference, out)
        (out / ".checkpoint-8.tmp").mkdir()  # left by a save killed in some earlier attempt
        (out / ".checkpoint-8.tmp" / "optimizer.bin").write_bytes(b"partial")
        rec = run(db, argv(out, *STEPS, "--max_train_steps", str(last), "--resume_from_checkpoint", ckpt))
        assert not (out / ".checkpoint-8.tmp").exists()  # cleaned up at the start (no save happens here)
        assert rec["status"] == "done" and rec["global_step"] == last
        assert rec["resumed_from"].endswith(f"checkpoint-{last}")
        assert T.read_run_record(out)["global_step"] == last
        want = {k: v for k, v in losses(reference).items() if k[1] <= last}
        assert losses(out) == want  # no step past the last one in the log
        a, b = load_file(reference / f"checkpoint-{last}" / T.ADAPTER_STATE), load_file(out / T.ADAPTER_STATE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's weights


def test_overwrite_checks_everything_first_and_keeps_what_is_not_dashdiffs(db, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "README.md").write_text("my own notes\n")
    (out / "checkpoint-100").mkdir()
    (out / "checkpoint-100" / "weights.ckpt").write_text("not dashdiff's")
    before = snapshot(out)
    # a bad input is found before anything is removed
    with pytest.raises(T.TrainingError, match="does not exist"):
        run(db, argv(out, "--max_train_steps", "1", "--overwrite_output_dir", "--instance_data_dir",
                     str(tmp_path / "missing")))
    assert snapshot(out) == before
    rec = run(db, argv(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--overwrite_output_dir"))
    assert rec["status"] == "done"
    assert (out / "README.md").read_text() == "my own notes\n"
    assert (out / "checkpoint-100" / "weights.ckpt").read_text() == "not dashdiff's"
    assert "dashdiff" in (out / "README.dashdiff.md").read_text()
    # the previous run's checkpoints and log are gone, this run's are there
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1", "checkpoint-100", "checkpoint-2"]
    assert sorted(losses(out)) == [("train", 1), ("train", 2)]


# =========================================================================== fault injection

# Where a save is killed: before anything is written, after accelerate's files, after the marker
# (complete but not yet renamed), after the rename (before the pruning), or at a random delay.
KILL_POINTS = ("begin", "state", "marker", "renamed")


def fault_plan(seed: int) -> list[tuple[int, str]]:
    """(checkpoint step, kill point) of the 3 trials: a random delay into the save, the moment the
    new checkpoint is complete but not in place (with limit 1 the old one must still be there),
    and one of the other points."""
    rng = random.Random(seed)
    return [(rng.choice([2, 4]), f"delay={rng.uniform(0.0, 0.06):.3f}"), (4, "marker"),
            (rng.choice([2, 4]), rng.choice([p for p in KILL_POINTS if p != "marker"]))]


@pytest.mark.parametrize("trial", range(3))
def test_a_save_killed_anywhere_resumes_to_the_same_run(db, reference, tmp_path, trial, caplog):
    """SIGKILL during a checkpoint save (seeded points; DASHDIFF_FAULT_SEED picks other ones), with
    --checkpoints_total_limit 1, then --resume_from_checkpoint latest: the losses of every step and
    the final weights equal the uninterrupted run's."""
    step, point = fault_plan(int(os.environ.get("DASHDIFF_FAULT_SEED", "0")))[trial]
    out = tmp_path / "out"
    args = argv(out, *STEPS, "--checkpoints_total_limit", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "DASHDIFF_TEST_KILL": f"checkpoint-{step}:{point}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--resume_from_checkpoint", "latest"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (step, point, proc.returncode, proc.stderr[-3000:])
    assert (out / T.LOCK_FILE).exists()  # a killed run cannot release its lock
    left = sorted(p.name for p in out.iterdir())
    complete = [c.path.name for c in T.list_checkpoints(out, complete=True)]
    if step == 4:  # limit 1 never leaves the folder without a usable checkpoint
        assert "checkpoint-2" in complete or "checkpoint-4" in complete, (point, left)
    if point == "marker":  # complete but not renamed: not a checkpoint yet, the previous one stays
        assert f".checkpoint-{step}.tmp" in left and f"checkpoint-{step}" not in left, left
        assert complete == ([f"checkpoint-{step - 2}"] if step > 2 else []), complete
    if point == "renamed":  # renamed, the older one not pruned yet
        assert complete == [f"checkpoint-{s}" for s in range(2, step + 1, 2)][-2:], complete
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        rec = run(db, args + ["--resume_from_checkpoint", "latest"])
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "replaced a stale lock" in msgs, msgs
    assert rec["status"] == "done" and rec["global_step"] == 6
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"], (step, point)
    assert not (out / T.LOCK_FILE).exists()
