"""bench/sass_loops.py (the SASS instruction counts behind the sampling kernel's predictions) on a synthetic listing:
loops are found from backward branches, ranges are counted inclusively by opcode."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sass_loops.py"

LISTING = """
        Function : _Z3fooPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   FFMA R2, R2, R3, R4 ;
        /*0030*/               @P0 FFMA R2, R2, R3, R4 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
        Function : _Z3barPf
        /*0000*/                   EXIT ;
"""


def _run(tmp_path, *args):
    f = tmp_path / "k.sass"
    f.write_text(LISTING)
    return subprocess.run([sys.executable, str(SCRIPT), str(f), *args], capture_output=True, text=True, check=True).stdout


def test_loops_and_ranges(tmp_path):
    out = _run(tmp_path, "_Z3foo")
    assert "loop 0x00010-0x00040: 4 instructions" in out and "'FFMA': 2" in out
    out = _run(tmp_path, "_Z3foo", "10-30")
    assert out.startswith("3 ") and "'FFMA': 2" in out and "'FADD': 1" in out
