"""List the loops of a kernel's SASS and count the instructions of address ranges (review R3's cost model).

    nvcc -cubin -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -DMDLM_WITH_CUDA=1 \
         csrc/cuda/sampling_cuda.cu -o /tmp/s90.cubin
    .venv/lib/python3.11/site-packages/triton/backends/nvidia/bin/cuobjdump -sass /tmp/s90.cubin > /tmp/s90.sass
    python bench/sass_loops.py /tmp/s90.sass sample_step_kernelItLb0        # loops (backward branches): bf16, entropy off
    python bench/sass_loops.py /tmp/s90.sass sample_step_kernelItLb0 7de0-7ed0 9980-af70   # the full-chunk path: 368

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


def main():
    path, name, ranges = sys.argv[1], sys.argv[2], sys.argv[3:]
    ins = parse(path, name)
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
