"""Plant mutants one at a time in a copy of the repository and run the tests that should kill them.

Made for the mutants only a GPU can kill (BENCHMARKS.md, "Mutation testing"): mutmut runs here on a CPU,
where they survive, so their diffs are kept in ``tests/fixtures/gpu_mutants/`` and this script plants each on
the GPU machine:

    python tests/scripts/plant_mutants.py                       # every mutant listed in mutants.json
    python tests/scripts/plant_mutants.py --only 'dashdiff.dash.kernel*'
    python tests/scripts/plant_mutants.py --list other.json     # another list (e.g. a CPU check of this script)

``mutants.json`` (beside the diffs): ``{"<mutant name>": {"diff": "<file>.diff", "tests": ["tests/...::test_x"],
"expect": "killed"}}``. A diff is either ``mutmut show <name>`` output (one function, its lines numbered from
the function's start and, for a method, without the class's indentation) or an ordinary unified diff of the
file; each hunk is applied by finding its old lines in the file (indented by 0, 4, 8 or 12 spaces, exactly
once) and putting its new lines there, so both kinds apply the same way.

One temporary tree (copies of ``dashdiff/``, ``tests/``, ``train/``, ``bench/``, ``app.py`` and
``pyproject.toml``, ``assets/`` linked); for each mutant its diff applied, ``python -m pytest`` of the listed node
ids run from that tree, so that its ``dashdiff`` is the one imported (checked before anything runs: the
editable install of another checkout must not win), then the file put back. The same tests first run once unpatched: a
failing baseline would make every mutant look killed. Prints a Markdown table ``mutant | test | result |
seconds`` and exits 1 if the baseline fails, a diff does not apply, or a mutant expected killed survives.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "tests" / "fixtures" / "gpu_mutants"
COPIED = ("dashdiff", "tests", "train", "bench", "app.py", "pyproject.toml")
LINKED = ("assets",)  # read-only and large: linked, not copied
HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def parse_diff(text: str) -> tuple[str, list[tuple[list[str], list[str]]]]:
    """The diffed file (relative to the repository) and its hunks as (old lines, new lines). A hunk's body is
    as long as its header's line counts say (so a removed line that reads ``-- x`` is not a file header)."""
    target, hunks = None, []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("--- "):
            path = line[4:].split("\t")[0].strip()
            for prefix in ("a/", "b/", "mutants/"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            if "dashdiff/" in path:  # an absolute path into some checkout's tree or mutants/
                path = path[path.index("dashdiff/"):]
            target = path
            continue
        m = HUNK.match(line)
        if not m:
            continue  # "# <name>: survived" (mutmut show's first line), "+++ ", "\ No newline at end of file"
        want_old, want_new = int(m.group(1) or 1), int(m.group(2) or 1)
        old, new = [], []
        while (len(old) < want_old or len(new) < want_new) and i < len(lines):
            body = lines[i]
            i += 1
            if body.startswith("\\"):
                continue
            tag, rest = (body[0], body[1:]) if body else (" ", "")
            if tag not in " -+":
                raise ValueError(f"unexpected line in a hunk: {body!r}")
            if tag in " -":
                old.append(rest)
            if tag in " +":
                new.append(rest)
        hunks.append((old, new))
    if target is None or not hunks:
        raise ValueError("not a unified diff with a --- header and at least one hunk")
    return target, hunks


def apply_hunks(source: str, hunks: list[tuple[list[str], list[str]]]) -> str:
    """Each hunk's old lines found once in ``source`` at one uniform extra indentation, replaced by its new lines
    at that indentation (blank lines stay blank)."""
    lines = source.split("\n")
    for old, new in hunks:
        matches = []
        for indent in ("", " " * 4, " " * 8, " " * 12):
            want = [indent + x if x.strip() else x for x in old]
            n = len(want)
            for i in range(len(lines) - n + 1):
                if [x.rstrip() for x in lines[i:i + n]] == [x.rstrip() for x in want]:
                    matches.append((i, indent))
            if matches:
                break
        if len(matches) != 1:
            raise ValueError(f"a hunk's {len(old)} old lines match the file {len(matches)} times (want 1): "
                             f"{old[:3]}")
        i, indent = matches[0]
        lines[i:i + len(old)] = [indent + x if x.strip() else x for x in new]
    return "\n".join(lines)


def make_tree(tmp: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "mutants"))
        elif src.exists():
            shutil.copy2(src, tmp / name)
    for name in LINKED:
        if (ROOT / name).exists():
            (tmp / name).symlink_to(ROOT / name)


def env_for(tree: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def check_import(tree: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import dashdiff; print(dashdiff.__file__)"], cwd=tree,
                         env=env_for(tree), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the planted tree is not what imports: dashdiff comes from {out}")


def run_tests(tree: Path, tests: list[str], extra: list[str]) -> tuple[bool, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *extra, *tests],
                          cwd=tree, env=env_for(tree), capture_output=True, text=True)
    # 0: passed; 1: a test failed. Anything else (nothing collected, a usage or internal error) is not a verdict.
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"pytest exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.returncode == 0, time.perf_counter() - start, proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="folder of the diffs and the list")
    ap.add_argument("--list", type=Path, default=None, help="the list (default: <dir>/mutants.json)")
    ap.add_argument("--only", default="*", help="fnmatch pattern of mutant names to plant")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree (printed)")
    ap.add_argument("--apply-only", action="store_true",
                    help="only check that every diff applies (and compiles); run no test (e.g. the GPU list on a CPU)")
    args = ap.parse_args(argv)
    listing = json.loads((args.list or args.dir / "mutants.json").read_text())
    chosen = {k: v for k, v in listing.items() if fnmatch.fnmatch(k, args.only) and not k.startswith("_")}
    if not chosen:
        print("no mutant matches", file=sys.stderr)
        return 1
    extra = args.pytest_args.split()
    tmp = Path(tempfile.mkdtemp(prefix="plant_mutants."))
    failures = []
    rows = ["| mutant | test | result | seconds |", "|---|---|---|---|"]
    try:
        make_tree(tmp)
        check_import(tmp)
        baseline = sorted({t for m in chosen.values() for t in m["tests"]})
        ok, secs, out = (True, 0.0, "") if args.apply_only else run_tests(tmp, baseline, extra)
        rows.append(f"| (baseline, unpatched) | {len(baseline)} test(s) | {'passed' if ok else 'FAILED'} | {secs:.1f} |")
        if not ok:
            failures.append("baseline")
            print(out[-3000:], file=sys.stderr)
        for name, spec in chosen.items() if ok else ():
            tests = " ".join(t.split("::", 1)[-1] for t in spec["tests"])
            try:
                target, hunks = parse_diff((args.dir / spec["diff"]).read_text())
                path = tmp / target
                original = path.read_text()
                path.write_text(apply_hunks(original, hunks))
            except (ValueError, OSError) as err:
                rows.append(f"| {name} | {tests} | diff does not apply: {err} | |")
                failures.append(name)
                continue
            try:
                if args.apply_only:
                    compile(path.read_text(), str(path), "exec")
                    rows.append(f"| {name} | {tests} | applies | |")
                    continue
                passed, secs, _ = run_tests(tmp, spec["tests"], extra)
            finally:  # the next mutant starts from the unpatched tree (bytecode is not written: env_for)
                path.write_text(original)
            result = "survived" if passed else "killed"
            expected = spec.get("expect", "killed")
            rows.append(f"| {name} | {tests} | {result}{'' if result == expected else ' (UNEXPECTED)'} | {secs:.1f} |")
            if result != expected:
                failures.append(name)
    finally:
        if args.keep:
            print(f"tree kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(rows))
    if failures:
        print(f"\nunexpected: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
