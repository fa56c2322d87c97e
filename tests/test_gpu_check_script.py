"""bench/gpu_check.sh runs on a lent GPU machine with minutes of device time: a typo there costs a whole
session. These CPU tests check what can be checked without a GPU: the script parses, every benchmark it calls
exists and accepts the flags it passes, and its time-budget helper caps and skips steps as documented."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _calls():
    """(script path, [flags]) for every `python bench/....py` / `python "$ROOT/bench/....py"` call."""
    text = SCRIPT.read_text()
    calls = []
    for m in re.finditer(r'python "?(?:\$ROOT/)?(bench/[\w_]+\.py)"?([^\n|]*)', text):
        flags = re.findall(r"(--[\w-]+)", m.group(2))
        calls.append((m.group(1), flags))
    return calls


def test_every_benchmark_call_uses_flags_the_script_accepts():
    calls = _calls()
    assert {c[0] for c in calls} >= {"bench/throughput.py", "bench/bench_sampling.py", "bench/bench_linear_ce.py",
                                     "bench/bench_blocks.py", "bench/kernels.py", "bench/train_smoke.py"}
    helps = {}
    for path, flags in calls:
        if path not in helps:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            r = subprocess.run([sys.executable, str(ROOT / path), "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=300, env=env)
            assert r.returncode == 0, (path, r.stderr[-2000:])
            helps[path] = r.stdout
        for f in flags:
            assert re.search(re.escape(f) + r"\b", helps[path]), f"{path} does not accept {f}"


@pytest.mark.parametrize("budget,elapsed,want,expected", [
    (480, 100, 200, 200),   # enough left: the step's own limit
    (480, 100, 500, 380),   # capped by what is left
    (130, 100, 200, 30),
    (110, 100, 200, 0),     # < 20 s left: skip
    (480, 500, 200, 0),     # over budget
])
def test_time_budget_limit(budget, elapsed, want, expected):
    fn = next(line for line in SCRIPT.read_text().splitlines() if line.startswith("limit()"))
    cmd = f'START=$(( $(date +%s) - {elapsed} )); BUDGET={budget}; {fn}; limit {want}'
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.strip()) == expected, (r.stdout, r.stderr)
