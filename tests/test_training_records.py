"""dashdiff/training/records.py: the step log and run record are strict JSON (NaN as null) and a torn
last line of the step log is dropped, a damaged one elsewhere named."""

import json

import pytest

from dashdiff import training as T


def test_eval_loss_is_null_not_nan_and_files_are_strict_json(tmp_path):
    log = T.StepLog(tmp_path / T.STEP_LOG)
    log.write({"event": "eval", "step": 1, "eval_loss": float("nan"), "other": float("inf"), "ok": 0.5})
    line = (tmp_path / T.STEP_LOG).read_text()
    assert "NaN" not in line and "Infinity" not in line

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert strict(line) == {"event": "eval", "step": 1, "eval_loss": None, "other": None, "ok": 0.5}
    T.write_run_record(tmp_path, {"results": {"eval_loss": float("nan")}})
    assert strict((tmp_path / T.RUN_RECORD).read_text())["results"]["eval_loss"] is None
    from dashdiff.safeio import write_json

    with pytest.raises(ValueError):  # a raw NaN never reaches a file as bare NaN
        write_json({"x": float("nan")}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_step_log_with_a_torn_last_line(tmp_path):
    path = tmp_path / T.STEP_LOG
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert [r["step"] for r in T.StepLog.read(path)] == [1, 2]
    T.StepLog(path).truncate(lambda r: r["step"] <= 1)
    assert path.read_text() == '{"loss": 1.0, "step": 1}\n'
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(T.TrainingError, match=r"line 2 is damaged"):
        T.StepLog.read(path)
