"""dashdiff/training/checkpoints.py: which checkpoints count as complete, resume and pruning on their
own, clean-up of unfinished saves, damaged markers (the scripts' fault runs are in
test_checkpoint_safety.py)."""

import logging
from pathlib import Path

import pytest

from dashdiff import training as T


def test_latest_skips_incomplete_and_an_explicit_incomplete_one_is_refused(tmp_path, caplog):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"x" * 10)
    T.write_checkpoint_info(out / "checkpoint-2", {"step": 2, "files": {"optimizer.bin": 10}})
    T.write_checkpoint_info(out / "checkpoint-4", {"step": 4, "files": {"optimizer.bin": 11}})  # truncated file
    # checkpoint-6: no marker (a save killed by an older version, or not dashdiff's)
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        assert T.resolve_resume(out, "latest").path.name == "checkpoint-2"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "skipping incomplete checkpoint-4, checkpoint-6" in lines[0], lines
    with pytest.raises(T.TrainingError, match=r"checkpoint-4 is not a complete dashdiff checkpoint: optimizer.bin "
                                              r"has 10 bytes, the checkpoint recorded 11.*checkpoint-2"):
        T.resolve_resume(out, str(out / "checkpoint-4"))
    with pytest.raises(T.TrainingError, match="checkpoint-6 is not a complete.*no dashdiff_checkpoint.json"):
        T.resolve_resume(out, "checkpoint-6")
    # pruning only ever removes complete checkpoints
    assert T.prune_checkpoints(out, 1, keep_free=1) == [out / "checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_only_unfinished_checkpoint_folders_are_cleaned(tmp_path):
    out = tmp_path / "out"
    keep = ["checkpoint-3", ".checkpoint-x.tmp", "checkpoint-4.tmp", ".checkpoint-4.tmp.bak", "notes.tmp"]
    gone = [".checkpoint-4.tmp", ".checkpoint-search-2.tmp", ".checkpoint-6.tmp-old"]
    for name in keep + gone:
        (out / name).mkdir(parents=True)
        (out / name / "f").write_text("x")
    (out / ".checkpoint-8.tmp").write_text("a file, not a folder")
    assert sorted(p.name for p in T.clean_stale_temporaries(out)) == sorted(gone)
    assert sorted(p.name for p in out.iterdir()) == sorted(keep + [".checkpoint-8.tmp"])


def test_damaged_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / T.CHECKPOINT_STATE).write_text('{"step": 2, "pha')
    with pytest.raises(T.TrainingError, match=r"dashdiff_checkpoint.json is damaged"):
        T.read_checkpoint_info(ckpt)
    (ckpt / T.CHECKPOINT_STATE).write_text('{"step": 2}')
    (ckpt / T.ADAPTER_STATE).write_bytes(b"")
    with pytest.raises(T.TrainingError, match=r"lacks optimizer.bin"):
        T.read_checkpoint_info(ckpt)
    (ckpt / "optimizer.bin").write_bytes(b"")
    assert T.read_checkpoint_info(ckpt) == {"step": 2}


# --------------------------------------------------------------------------- names, restarts, hooks, checks, moves


def _complete(folder, step=2, extra=None):
    """A complete checkpoint as save_checkpoint leaves it: the files, then the marker with their sizes."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}, folder / "optimizer.bin")
    (folder / T.ADAPTER_STATE).write_bytes(b"adapter")
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    T.write_checkpoint_info(folder, {"step": step, "files": files})
    return folder


def test_checkpoint_names_and_restarts_in_place(tmp_path):
    assert T.checkpoint_name("search", 3) == "checkpoint-search-3" and T.checkpoint_name("train", 12) == "checkpoint-12"
    with pytest.raises(ValueError) as e:
        T.checkpoint_name("retrain", 1)
    assert str(e.value) == "unknown phase 'retrain'"
    out = tmp_path / "out"
    out.mkdir()
    assert T.restarts_in_place(out, "latest", None, "fp") is False  # no run record: not this run's folder
    T.write_run_record(out, {"fingerprint": "fp"})
    assert T.restarts_in_place(out, "latest", None, "fp") is True
    assert T.restarts_in_place(out, "latest", None, "other") is False  # another run's folder
    assert T.restarts_in_place(out, "checkpoint-2", None, "fp") is False  # not "latest"
    assert T.restarts_in_place(out, None, None, "fp") is False
    assert T.restarts_in_place(out, "latest", T.Checkpoint(out / "checkpoint-2", "train", 2), "fp") is False


def test_state_hooks_save_and_load_the_adapter_file_only(tmp_path):
    class Acc:
        def __init__(self, main):
            self.is_main_process, self.hooks = main, {}

        def register_save_state_pre_hook(self, hook):
            self.hooks["save"] = hook

        def register_load_state_pre_hook(self, hook):
            self.hooks["load"] = hook

    calls = []
    host = object()
    for main in (True, False):
        acc = Acc(main)
        T.register_state_hooks(acc, lambda: host, lambda h, p: calls.append(("save", h, p)),
                               lambda h, p: calls.append(("load", h, p)))
        weights, models = [{"w": 1}, {"w": 2}], ["unet", "te"]
        acc.hooks["save"](models, weights, str(tmp_path))
        assert weights == [] and models == ["unet", "te"]  # accelerate then writes no full model
        acc.hooks["load"](models, str(tmp_path))
        assert models == []
    path = str(tmp_path / T.ADAPTER_STATE)
    assert calls == [("save", host, path), ("load", host, path), ("load", host, path)]  # saved by the main process only


def test_validate_checkpoint_refuses_incomplete_ones_and_pickles_of_more_than_data(tmp_path, capsys):
    import io

    import torch

    good = _complete(tmp_path / "checkpoint-2", extra={"notes.txt": b"not a pickle: not loaded"})
    assert T.validate_checkpoint(good)["step"] == 2

    class Crafted:
        def __reduce__(self):
            return (print, ("crafted code ran",))

    buf = io.BytesIO()
    torch.save({"rng": Crafted()}, buf)  # torch's own file format, as accelerate's RNG file is
    bad = _complete(tmp_path / "checkpoint-4", extra={"random_states_0.pkl": buf.getvalue()})
    with pytest.raises(T.TrainingError) as e:
        T.validate_checkpoint(bad)
    assert "crafted code ran" not in capsys.readouterr().out  # refused, not run
    msg = str(e.value)
    assert msg.startswith(f"{bad / 'random_states_0.pkl'}: refused to load it: it is not plain tensor/number data as "
                          "a dashdiff checkpoint holds (it may have been crafted to run code when loaded; nothing was "
                          "executed). Resume from another checkpoint, or delete this one. (Weights only load failed")
    reason = msg[msg.rindex(" (Weights only") + 2:-1]
    assert len(reason) <= 200 and "\n" not in reason  # the first line of torch's reason, cut to 200 characters
    recorded = (good / "optimizer.bin").stat().st_size
    (good / "optimizer.bin").write_bytes(b"cut")  # another size than the marker records
    with pytest.raises(T.TrainingError) as e:
        T.validate_checkpoint(good)
    assert str(e.value) == (f"{good} is not a complete dashdiff checkpoint: optimizer.bin has 3 bytes, the checkpoint "
                            f"recorded {recorded}")


def test_a_checkpoint_in_the_way_is_replaced_if_complete_and_kept_aside_if_not(tmp_path, caplog):
    import logging

    from dashdiff.training.checkpoints import _move_into_place

    out = tmp_path / "out"
    final = _complete(out / "checkpoint-2")
    (out / ".checkpoint-2.tmp-old").mkdir()  # left by a replace killed half-way: cleared first
    (out / ".checkpoint-2.tmp-old" / "f").write_text("x")
    new = _complete(out / ".checkpoint-2.tmp", step=22)
    _move_into_place(new, final)
    assert T.read_checkpoint_info(final)["step"] == 22 and not new.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # the replaced one and its aside name are gone
    for n, aside in enumerate(("checkpoint-2.unmarked", "checkpoint-2.unmarked1", "checkpoint-2.unmarked2")):
        (final / T.CHECKPOINT_STATE).unlink()  # someone else's folder now
        new = _complete(out / ".checkpoint-2.tmp", step=30 + n)
        with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
            _move_into_place(new, final)
        assert (out / aside).is_dir() and T.read_checkpoint_info(final)["step"] == 30 + n
        assert caplog.records[-1].getMessage() == (
            f"{final} was in the way and is not a complete dashdiff checkpoint (no dashdiff_checkpoint.json (an "
            f"interrupted save, or not written by dashdiff)): kept as {aside}")
    new = _complete(out / ".checkpoint-2.tmp", step=40)  # a complete one in the way, no leftover aside folder
    _move_into_place(new, final)
    assert T.read_checkpoint_info(final)["step"] == 40 and not (out / ".checkpoint-2.tmp-old").exists()


def test_resume_resolution_word_for_word(tmp_path, caplog):
    import logging

    flags = T.FlagNames(resume="--resume_from_checkpoint")
    out = tmp_path / "out"
    with pytest.raises(T.TrainingError) as e:
        T.resolve_resume(out, "checkpoint-9", flags)
    assert str(e.value) == (f"--resume_from_checkpoint checkpoint-9: no such checkpoint (checkpoints in {out}: none); "
                            "pass one of them or 'latest'")
    _complete(out / "checkpoint-search-1", step=1)
    _complete(out / "checkpoint-2")
    (out / "checkpoint-5").mkdir()  # no marker
    _complete(out / "checkpoint-7", step=7)
    (out / "checkpoint-7" / "optimizer.bin").write_bytes(b"cut")  # another size than recorded
    (out / "mine").mkdir()
    with pytest.raises(T.TrainingError) as e:
        T.resolve_resume(out, "checkpoint-9", flags)
    assert str(e.value).endswith(f"(checkpoints in {out}: checkpoint-search-1, checkpoint-2, checkpoint-5, "
                                 "checkpoint-7); pass one of them or 'latest'")
    with pytest.raises(T.TrainingError) as e:
        T.resolve_resume(out, str(out / "mine"), flags)
    assert str(e.value) == (f"--resume_from_checkpoint {out / 'mine'}: {out / 'mine'} is not named checkpoint-<step> "
                            "or checkpoint-search-<step>; pass a folder the script wrote, or 'latest'")
    with pytest.raises(T.TrainingError) as e:
        T.resolve_resume(out, "checkpoint-5", flags)
    assert str(e.value).endswith(": no dashdiff_checkpoint.json (an interrupted save, or not written by dashdiff). Resume "
                                 "from a complete one (in that folder: checkpoint-search-1, checkpoint-2) or pass 'latest'.")
    assert T.resolve_resume(out, "checkpoint-search-1") == T.Checkpoint((out / "checkpoint-search-1").resolve(), "search", 1)
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        assert T.resolve_resume(out, "latest", flags).path.name == "checkpoint-2"
    recorded = json_size(out / "checkpoint-7")
    assert [r.getMessage() for r in caplog.records] == [
        "--resume_from_checkpoint latest: skipping incomplete checkpoint-5, checkpoint-7 (optimizer.bin has 3 bytes, the "
        f"checkpoint recorded {recorded}); resuming from checkpoint-2"]  # the newest one's problem
    caplog.clear()
    empty = tmp_path / "empty"
    (empty / "checkpoint-3").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        assert T.resolve_resume(empty, "latest", flags) is None
    assert [r.getMessage() for r in caplog.records] == [
        "--resume_from_checkpoint latest: skipping incomplete checkpoint-3 (no dashdiff_checkpoint.json (an interrupted "
        "save, or not written by dashdiff)); resuming from nothing (a fresh start)"]
    with pytest.raises(T.TrainingError) as e:
        T.resolve_resume(empty, "checkpoint-3", flags)
    assert str(e.value).endswith("Resume from a complete one (in that folder: none) or pass 'latest'.")


def test_pruning_by_default_makes_room_for_one_more(tmp_path):
    out = tmp_path / "out"
    for step in (1, 2, 3):
        _complete(out / f"checkpoint-{step}", step=step)
    assert T.prune_checkpoints(out, 2) == [out / "checkpoint-1", out / "checkpoint-2"]  # 3 + 1 to come - 2 allowed
    assert T.prune_checkpoints(out, None) == [] and sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


def test_a_deletion_killed_midway_leaves_only_a_temporary_folder(tmp_path, monkeypatch):
    """Pruning renames a checkpoint aside before deleting it: a kill inside the deletion (here an
    exception after the first file) leaves a ``.tmp`` folder that the next start cleans, never a
    half-deleted ``checkpoint-<n>`` that later pruning would not recognise as complete."""
    out = tmp_path / "out"
    for step in (1, 2):
        _complete(out / f"checkpoint-{step}", step=step)
        (out / f"checkpoint-{step}" / "b.bin").write_bytes(b"y")
    real_rmtree = T.checkpoints.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        files = sorted(Path(path).glob("*")) if Path(path).exists() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("killed during the deletion")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(T.checkpoints.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        T.prune_checkpoints(out, 1)
    monkeypatch.setattr(T.checkpoints.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint-1.tmp-pruned", "checkpoint-2"]
    assert T.clean_stale_temporaries(out) == [out / ".checkpoint-1.tmp-pruned"]
    assert [c.path.name for c in T.list_checkpoints(out)] == ["checkpoint-2"]
    # a leftover of the same name from an earlier kill does not stop the next pruning
    (out / ".checkpoint-2.tmp-pruned").mkdir()
    assert T.prune_checkpoints(out, 1) == [out / "checkpoint-2"]
    assert list(out.iterdir()) == []


def json_size(folder) -> int:
    import json

    return json.loads((folder / T.CHECKPOINT_STATE).read_text())["files"]["optimizer.bin"]


def test_clean_up_and_damaged_markers_word_for_word(tmp_path, caplog):
    import logging

    out = tmp_path / "out"
    for name in (".checkpoint-4.tmp", ".checkpoint-search-2.tmp"):
        (out / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        T.clean_stale_temporaries(out)
    assert [r.getMessage() for r in caplog.records] == [
        "removed 2 unfinished checkpoint folder(s) left by an interrupted save: .checkpoint-4.tmp, .checkpoint-search-2.tmp"]
    ckpt = _complete(tmp_path / "checkpoint-2")
    (ckpt / T.CHECKPOINT_STATE).write_text("[1, 2]")
    with pytest.raises(T.TrainingError) as e:
        T.read_checkpoint_info(ckpt)
    assert str(e.value) == f"{ckpt / T.CHECKPOINT_STATE} is damaged (not a JSON object): resume from another checkpoint"
    (ckpt / T.CHECKPOINT_STATE).write_text("{}")
    (ckpt / "optimizer.bin").unlink()
    (ckpt / T.ADAPTER_STATE).unlink()
    with pytest.raises(T.TrainingError) as e:
        T.read_checkpoint_info(ckpt)
    assert str(e.value) == (f"{ckpt} lacks {T.ADAPTER_STATE}, optimizer.bin (an interrupted save?): resume from another "
                            "checkpoint")
    (ckpt / T.CHECKPOINT_STATE).unlink()
    with pytest.raises(T.TrainingError) as e:
        T.read_checkpoint_info(ckpt)
    assert str(e.value) == f"{ckpt} has no {T.CHECKPOINT_STATE}: it was not written by a dashdiff script"


# --------------------------------------------------------------------------- the save's helpers


def test_fault_point_kills_only_at_the_named_checkpoint_and_point(monkeypatch):
    """The test-only kill hook: SIGKILL of this process at exactly ``<name>:<where>`` (a checkpoint whose
    name merely starts with ``name`` does not match), a timer for ``delay=<s>`` armed at ``begin`` only,
    and nothing when the variable is unset."""
    import os
    import signal

    from dashdiff.training import checkpoints as C

    kills, timers = [], []

    class Timer:
        def __init__(self, seconds, fn, args):
            timers.append((seconds, fn, args))

        def start(self):
            timers.append("started")

    monkeypatch.setattr(C.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(C.threading, "Timer", Timer)
    monkeypatch.delenv("DASHDIFF_TEST_KILL", raising=False)
    C._fault_point("checkpoint-train-3", "begin")
    monkeypatch.setenv("DASHDIFF_TEST_KILL", "")
    C._fault_point("checkpoint-train-3", "begin")
    monkeypatch.setenv("DASHDIFF_TEST_KILL", "checkpoint-train-30:after_state")
    C._fault_point("checkpoint-train-3", "after_state")  # a longer name that starts with this one
    monkeypatch.setenv("DASHDIFF_TEST_KILL", "checkpoint-train-3:after_state")
    C._fault_point("checkpoint-train-3", "before_rename")
    C._fault_point("checkpoint-train-4", "after_state")
    assert kills == [] and timers == []
    C._fault_point("checkpoint-train-3", "after_state")
    assert kills == [(os.getpid(), signal.SIGKILL)]
    monkeypatch.setenv("DASHDIFF_TEST_KILL", "checkpoint-train-3:delay=1.25")
    C._fault_point("checkpoint-train-3", "after_state")  # a delay is armed at the save's beginning only
    assert timers == []
    C._fault_point("checkpoint-train-3", "begin")
    assert timers == [(1.25, C.os.kill, (os.getpid(), signal.SIGKILL)), "started"]
    assert kills == [(os.getpid(), signal.SIGKILL)]  # the timer did not fire here


def test_gather_errors_one_process_and_many(monkeypatch):
    """Every process's error text, ``"<Type>: <message>"``, with the processes that had none left out."""
    import accelerate.utils

    from dashdiff.training import checkpoints as C

    class Acc:
        num_processes = 1

    assert C._gather_errors(Acc(), None) == []
    assert C._gather_errors(Acc(), OSError(28, "No space left on device")) == ["OSError: [Errno 28] No space left on device"]
    sent = []

    def gather_object(obj):
        sent.append(obj)
        return [*obj, None, "ValueError: rank 2"]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    for n in (2, 3):
        Acc.num_processes = n
        assert C._gather_errors(Acc(), KeyError("k")) == ["KeyError: 'k'", "ValueError: rank 2"]
        assert C._gather_errors(Acc(), None) == ["ValueError: rank 2"]
    assert sent == [["KeyError: 'k'"], [None]] * 2


def test_fsync_syncs_and_closes_and_forgives_only_folders(monkeypatch, tmp_path):
    """A file's data, then its folder, reach the disk: ``os.fsync`` of a descriptor opened read-only
    (``O_DIRECTORY`` for a folder), always closed; EINVAL / EBADF are forgiven for a folder only (some
    file systems cannot fsync one), every other error is raised."""
    import errno
    import os

    from dashdiff.training import checkpoints as C

    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    opened, synced, closed = [], [], []
    real_open, real_close = os.open, os.close

    def fake_open(path, flags):
        fd = real_open(path, flags)
        opened.append((Path(path), flags, fd))
        return fd

    monkeypatch.setattr(C.os, "open", fake_open)
    monkeypatch.setattr(C.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    monkeypatch.setattr(C.os, "fsync", lambda fd: synced.append(fd))
    C._fsync(f)
    C._fsync(tmp_path, directory=True)
    assert [(p, fl) for p, fl, _ in opened] == [(f, os.O_RDONLY), (tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    assert synced == closed == [fd for *_, fd in opened]

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    for code in (errno.EINVAL, errno.EBADF):
        monkeypatch.setattr(C.os, "fsync", failing(code))
        C._fsync(tmp_path, directory=True)  # forgiven
        with pytest.raises(OSError):
            C._fsync(f)
    monkeypatch.setattr(C.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError):
        C._fsync(tmp_path, directory=True)
    assert len(closed) == len(opened) == 2 + 5  # closed after every failure too


class _SaveAcc:
    """The accelerator surface save_checkpoint uses: ``save_state`` writes one file (or raises ``fail``)."""

    def __init__(self, main=True, processes=1, fail=None):
        self.is_main_process, self.num_processes, self.fail = main, processes, fail

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.fail is not None:
            raise self.fail


def _saved(root, phase, step):
    from dashdiff.training import checkpoints as C

    return C.save_checkpoint(_SaveAcc(), root, phase, step, {"k": 1})


def test_save_checkpoint_failure_messages_word_for_word(tmp_path):
    """A failed save names the disk when it is full and the first error otherwise, lists only the complete
    earlier checkpoints (or 'none'), tells how to go on with the caller's flag spelling, and leaves no
    checkpoint folder of its own."""
    from dashdiff.training import checkpoints as C
    from dashdiff.training.records import FlagNames

    root = tmp_path / "run"
    with pytest.raises(C.CheckpointWriteError) as err:
        C.save_checkpoint(_SaveAcc(fail=OSError(28, "No space left on device")), root, "train", 2, {})
    assert str(err.value) == (f"could not write checkpoint {root / 'checkpoint-2'}: the disk is full. The partial "
                              "checkpoint was removed; earlier checkpoints are intact (none). Free some space, then "
                              "resume with resume_from_checkpoint latest.")
    _saved(root, "train", 1)
    _saved(root, "search", 4)
    (root / "checkpoint-3").mkdir()  # incomplete: no marker
    with pytest.raises(C.CheckpointWriteError) as err:
        C.save_checkpoint(_SaveAcc(fail=ValueError("bad tensor")), root, "train", 5, {},
                          flags=FlagNames(resume="--resume_from_checkpoint"))
    assert str(err.value) == (f"could not write checkpoint {root / 'checkpoint-5'}: ValueError: bad tensor. The "
                              "partial checkpoint was removed; earlier checkpoints are intact (checkpoint-search-4, "
                              "checkpoint-1). Fix that, then resume with --resume_from_checkpoint latest.")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-search-4"]


def test_save_checkpoint_fault_points_in_order(monkeypatch, tmp_path):
    """The kill hook is reached at begin, state, marker and renamed of this checkpoint's save, in that order
    (the fault-injection test kills a save at each)."""
    import os

    from dashdiff.training import checkpoints as C

    seen = []
    for point in ("begin", "state", "marker", "renamed"):
        monkeypatch.setenv("DASHDIFF_TEST_KILL", f"checkpoint-7:{point}")
        monkeypatch.setattr(C.os, "kill", lambda pid, sig, p=point: seen.append((p, pid == os.getpid())))
        final = C.save_checkpoint(_SaveAcc(), tmp_path / point, "train", 7, {})
        assert final == tmp_path / point / "checkpoint-7" and C.checkpoint_problem(final) is None
    assert seen == [("begin", True), ("state", True), ("marker", True), ("renamed", True)]


def test_save_checkpoint_leaves_nothing_in_place_after_an_error_and_clears_an_old_temporary(tmp_path):
    """An error in save_state must not let the marker be written or the folder renamed; a leftover
    ``.checkpoint-<n>.tmp`` of a killed save is removed first (its files do not enter the new checkpoint)."""
    import json

    from dashdiff.training import checkpoints as C

    root = tmp_path / "run"
    with pytest.raises(C.CheckpointWriteError):
        C.save_checkpoint(_SaveAcc(fail=RuntimeError("torch.save failed")), root, "train", 2, {})
    assert sorted(p.name for p in root.iterdir()) == []
    (root / ".checkpoint-2.tmp").mkdir()
    (root / ".checkpoint-2.tmp" / "stale.bin").write_bytes(b"old")
    final = C.save_checkpoint(_SaveAcc(), root, "train", 2, {"note": "x"})
    assert sorted(p.name for p in final.iterdir()) == ["dashdiff_checkpoint.json", "model.safetensors"]
    marker = json.loads((final / "dashdiff_checkpoint.json").read_text())
    assert marker["files"] == {"model.safetensors": 7} and (marker["phase"], marker["step"], marker["note"]) == ("train", 2, "x")


def test_save_checkpoint_on_a_non_main_process_writes_no_marker(monkeypatch, tmp_path):
    """Only the main process writes the marker and renames: another process (no error anywhere) leaves
    its state in the temporary folder for the main process."""
    import accelerate.utils

    from dashdiff.training import checkpoints as C

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: [*obj, None])
    final = C.save_checkpoint(_SaveAcc(main=False, processes=2), tmp_path, "train", 3, {})
    assert not final.exists() and (tmp_path / ".checkpoint-3.tmp" / "model.safetensors").is_file()
    assert not (tmp_path / ".checkpoint-3.tmp" / "dashdiff_checkpoint.json").exists()


def test_save_checkpoint_prunes_older_ones_but_never_the_new_one(tmp_path, caplog):
    """After the new checkpoint is complete, older complete ones are pruned to the limit (logged with
    the limit's flag), and the new one is kept even when an earlier run left a later step."""
    import logging

    from dashdiff.training import checkpoints as C

    root = tmp_path / "run"
    for step in (1, 2):
        _saved(root, "train", step)
    with caplog.at_level(logging.INFO, logger=C.logger.name):
        C.save_checkpoint(_SaveAcc(), root, "train", 3, {}, total_limit=1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3"]
    assert [r.getMessage() for r in caplog.records if "removed old" in r.getMessage()] == [
        "removed old checkpoint(s) checkpoint-1, checkpoint-2 (checkpoints_total_limit 1)"]
    _saved(root, "train", 9)
    final = C.save_checkpoint(_SaveAcc(), root, "train", 5, {}, total_limit=1)  # older than checkpoint-9
    assert final.is_dir() and C.checkpoint_problem(final) is None


def test_save_checkpoint_syncs_files_then_folders_as_folders(monkeypatch, tmp_path):
    """Every file, then the marker, then the checkpoint folder and the output folder are synced, the two
    folders as folders (only a folder's fsync may be forgiven where a file system cannot do it)."""
    from dashdiff.training import checkpoints as C

    calls = []
    monkeypatch.setattr(C, "_fsync", lambda path, directory=False: calls.append((Path(path).name, directory)))
    C.save_checkpoint(_SaveAcc(), tmp_path / "run", "train", 4, {})
    assert calls == [("model.safetensors", False), ("dashdiff_checkpoint.json", False), (".checkpoint-4.tmp", True),
                     ("run", True)]


def test_save_checkpoint_error_while_finishing_is_raised_and_cleaned_up(monkeypatch, tmp_path):
    """A failure after the state was written (the marker on a full disk) is the same CheckpointWriteError,
    and the temporary folder goes: nothing half-written is left to resume from."""
    from dashdiff.training import checkpoints as C

    def full(path, info):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "write_checkpoint_info", full)
    root = tmp_path / "run"
    with pytest.raises(C.CheckpointWriteError, match="the disk is full"):
        C.save_checkpoint(_SaveAcc(), root, "train", 6, {})
    assert list(root.iterdir()) == []
