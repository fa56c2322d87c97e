"""List the loops of a kernel's SASS and count the instructions of address ranges (review R3's cost model).

    nvcc -cubin -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -DMDLM_WITH_CUDA=1 \
         csrc/cuda/sampling_cuda.cu -o /tmp/s90.cubin
    .venv/lib/python3.11/site-packages/triton/backends/nvidia/bin/cuobjdump -sass /tmp/s90.cubin > /tmp/s90.sass
    python bench/sass_loops.py /tmp/s90.sass sample_step_kernelItLb0        # loops (backward branches): bf16, entropy off
    python bench/sass_loops.py /tmp/s90.sass sample_step_kernelItLb0 7de0-7ed0 9980-af70   # count ranges
    python bench/sass_loops.py /tmp/s90.sass sample_step_kernelItLb0 --full-chunk   # pass 1's full-chunk path

A range is "lo-hi" in hex byte addresses, both ends included (each instruction is 16 bytes). Counts are static:
multiply by trip counts yourself. Figures derived this way are predictions, not measurements.
"""

import collections
import re
import sys


def parse(path, name):
    txt = open(path).read()
    for f in re.split(r"\n\s*Function : ", txt)[1:]:
        if name in f.split("\n", 1)[0]:
            out = []
            for line in f.split("\n"):
                m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
                if m:
                    out.append((int(m.group(1), 16), m.group(2).strip()))
            return out
    raise SystemExit(f"no function matching {name!r}")


def opcode(text):
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]


def loops(ins):
    """(start, end) addresses of the loops: a branch back to an earlier address closes one."""
    out = []
    for a, t in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            out.append((int(m.group(1), 16), a))
    return out


def full_chunk_path(ins, loads=16):
    """The sampling kernel's pass-1 full-chunk path: the innermost loop holding a run of ``loads`` consecutive
    unpredicated global loads (the unrolled chunk load of lane_load's full branch), taken as the loop's head up
    to the predicated branch that jumps to that run, plus the run to the loop's end (the partial-chunk branch
    in between is skipped). Returns the instructions [(address, text)] or None when no such loop exists."""
    addr = [a for a, _ in ins]
    run_start = None
    for i in range(len(ins) - loads + 1):
        if all(opcode(t) == "LDG" and not t.startswith("@") for _, t in ins[i:i + loads]):
            run_start = addr[i]
            break
    if run_start is None:
        return None
    inside = [(lo, hi) for lo, hi in loops(ins) if lo < run_start <= hi]
    if not inside:
        return None
    lo, hi = min(inside, key=lambda r: r[1] - r[0])
    head = []
    for a, t in ins:
        if lo <= a <= hi:
            head.append((a, t))
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) == run_start:
                break
    else:
        return None
    return head + [(a, t) for a, t in ins if run_start <= a <= hi]


def main():
    path, name, ranges = sys.argv[1], sys.argv[2], sys.argv[3:]
    ins = parse(path, name)
    if ranges == ["--full-chunk"]:
        sel = full_chunk_path(ins)
        if sel is None:
            raise SystemExit("no loop with an unrolled run of 16 global loads")
        ops = collections.Counter(opcode(t) for _, t in sel)
        print(f"full-chunk path {sel[0][0]:#07x}..{sel[-1][0]:#07x}: {len(sel)} instructions = "
              f"{len(sel) / 16:.2f} per element (16 per lane) {dict(ops.most_common())}")
        return
    if not ranges:
        at = {a: i for i, (a, _) in enumerate(ins)}
        for i, (a, t) in enumerate(ins):
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                body = ins[at[int(m.group(1), 16)]:i + 1]
                ops = collections.Counter(opcode(x) for _, x in body)
                print(f"loop {int(m.group(1), 16):#07x}-{a:#07x}: {len(body)} instructions {dict(ops.most_common(8))}")
        return
    rs = [tuple(int(x, 16) for x in r.split("-")) for r in ranges]
    sel = [(a, t) for a, t in ins if any(lo <= a <= hi for lo, hi in rs)]
    ops = collections.Counter(opcode(t) for _, t in sel)
    print(len(sel), dict(ops.most_common()))


if __name__ == "__main__":
    main()
