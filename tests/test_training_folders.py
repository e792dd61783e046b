"""dashdiff/training/folders.py: the output-folder lock (a second run refused, a stale lock replaced)
and what counts as another run's content."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from dashdiff import training as T


def test_lock_refuses_a_second_run_and_replaces_a_stale_one(tmp_path, caplog):
    out = tmp_path / "new"
    first = T.OutputLock(out).acquire()
    assert json.loads((out / T.LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(T.TrainingError, match=r"in use by another run \(pid %d on this host" % os.getpid()):
        T.OutputLock(out).acquire()
    first.release()
    assert not out.exists()  # the lock made the folder, nothing else was written: it is gone again

    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "start": T._process_start(sleeper.pid)}
        (out / T.LOCK_FILE).write_text(json.dumps(lock))
        with pytest.raises(T.TrainingError, match=f"pid {sleeper.pid} on this host"):
            T.OutputLock(out).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock is stale now that its process is gone: reported and replaced
    with caplog.at_level(logging.WARNING, logger="dashdiff.training"):
        held = T.OutputLock(out).acquire()
    assert any(f"stale lock in {out}: its run (pid {sleeper.pid}" in r.getMessage() for r in caplog.records)
    assert json.loads((out / T.LOCK_FILE).read_text())["pid"] == os.getpid()
    held.release()
    assert out.is_dir() and not (out / T.LOCK_FILE).exists()  # a folder it did not make stays
    # a pid that was reused by another process since (other start time) is stale too
    (out / T.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}))
    T.OutputLock(out).acquire().release()
    # another host: cannot be checked from here, so refused with the way out
    (out / T.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(T.TrainingError, match=r"run on host elsewhere .*delete .*\.dashdiff\.lock"):
        T.OutputLock(out).acquire()


def test_another_processs_write_probe_is_not_content(tmp_path):
    # Under DDP one rank's writability probe can exist while another rank checks the folder: that
    # rank refused "not empty (.dashdiff-write-test.…)" in a two-process run.
    out = tmp_path / "out"
    out.mkdir()
    (out / (T.WRITE_PROBE_PREFIX + "abc123")).write_bytes(b"")
    T.check_output_dir(out, "f" * 16, None, False)
    (out / "model.bin").write_bytes(b"x")
    with pytest.raises(T.TrainingError, match="not empty"):
        T.check_output_dir(out, "f" * 16, None, False)


def test_messages_name_the_settings_as_the_caller_spells_them(tmp_path):
    """The library names no command-line flag of its own: neutral setting names by default, the
    caller's spellings when given (the scripts pass theirs: test_run_flags.py)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(T.TrainingError) as neutral:
        T.check_output_dir(out, "f" * 16, None, False)
    assert str(neutral.value).startswith(f"output_dir {out} is not empty (mine.txt)")
    assert str(neutral.value).endswith("or pass overwrite_output_dir to write over it.")
    flags = T.FlagNames(output_dir="-o", resume="--resume", overwrite="--force", total_limit="-k")
    with pytest.raises(T.TrainingError) as worded:
        T.check_output_dir(out, "f" * 16, None, False, flags)
    assert str(worded.value).startswith(f"-o {out} is not empty") and "pass --force to write" in str(worded.value)
    with pytest.raises(T.TrainingError, match=r"^--resume checkpoint-9: no such checkpoint"):
        T.resolve_resume(out, "checkpoint-9", flags)
