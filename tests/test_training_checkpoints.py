"""dashdiff/training/checkpoints.py: which checkpoints count as complete, resume and pruning on their
own, clean-up of unfinished saves, damaged markers (the scripts' fault runs are in
test_checkpoint_safety.py)."""

import logging

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
