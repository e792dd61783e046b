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
