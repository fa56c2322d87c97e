"""The README's performance table, generated from the recorded GPU runs in bench/results/*.json.

    python bench/make_readme_table.py                      # print the Markdown table
    python bench/make_readme_table.py --update README.md   # replace the block between the markers

Only JSON files whose ``environment.device`` is "cuda" are read (CPU runs are ignored). One section per
benchmark kind: training throughput (bench/throughput.py), the SUBS loss stage (bench/bench_linear_ce.py),
the DiT block kernels and model rows (bench/bench_blocks.py) and sampling (bench/bench_sampling.py, or the
sampling section of bench/throughput.py). Every row names the GPU, the date and the git revision of its run.

``--update FILE`` replaces the text between the lines ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->`` (both must be present, once each, start before end); with no GPU run
recorded the block becomes "No GPU run recorded yet."
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
NO_RUN = "No GPU run recorded yet."
KINDS = {"throughput": "throughput", "subs_loss_stage": "linear_ce", "dit_blocks": "blocks",
         "sampling": "sampling"}


class MarkerError(ValueError):
    """The file to update lacks the perf-table markers (or has them more than once, or out of order)."""


# ---------------------------------------------------------------------------------------------- loading
def load_gpu_runs(results_dir) -> list[tuple[str, dict]]:
    """(file name, data) of every JSON in ``results_dir`` recorded on CUDA, oldest first."""
    runs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"warning: skipping {path.name}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        env = data.get("environment") or {}
        if env.get("device") != "cuda":
            continue
        runs.append((path.name, data))
    runs.sort(key=lambda r: (str((r[1].get("environment") or {}).get("date") or ""), r[0]))
    return runs


# ------------------------------------------------------------------------------------------- formatting
def _num(v, fmt="{:,.1f}", scale=1.0):
    if v is None:
        return "-"
    try:
        return fmt.format(float(v) * scale)
    except (TypeError, ValueError):
        return str(v)


def _pct(v):
    return _num(v, "{:.1f}%", 100.0)


def _run_cells(data):
    env = data.get("environment") or {}
    date = str(env.get("date") or "-")[:10]
    return [str(env.get("gpu") or "-"), date, str(env.get("git_revision") or "-")]


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _failed(r, ncols):
    msg = str(r.get("error", "")).splitlines()[0][:60] if r.get("error") else ""
    return ["failed" + (f": {msg}" if msg else "")] + ["-"] * (ncols - 1)


RUN = ["GPU", "date", "git"]


def throughput_section(runs):
    head = RUN + ["preset", "B x L", "dtype", "provider", "tokens/s", "step ms (median)", "peak GiB", "MFU",
                  "mJ/token"]
    rows = []
    for _, d in runs:
        run = _run_cells(d) + [str(d.get("preset", "-")), f"{d.get('batch', '-')} x {d.get('length', '-')}",
                               str(d.get("dtype", "-")).replace("torch.", "")]
        for r in d.get("results", []):
            if "error" in r:
                rows.append(run + [r.get("provider", "?")] + _failed(r, 5))
                continue
            rows.append(run + [r["provider"], _num(r.get("tokens_per_s"), "{:,.0f}"),
                               _num(r.get("median_s"), "{:.1f}", 1e3), _num(r.get("peak_mem_gib"), "{:.2f}"),
                               _pct(r.get("mfu")), _num(r.get("j_per_token"), "{:.3f}", 1e3)])
    return ["### Training step (`bench/throughput.py`)", "",
            "Full training step (forward, backward, AdamW, clip, EMA). MFU against the bf16 matmul rate measured "
            "in the same run, full LM head counted for every provider; energy from NVML power samples.", ""] \
        + _table(head, rows)


def linear_ce_section(runs):
    head = RUN + ["B x L, d, V", "dtype", "provider", "ms (median)", "% of matmul ceiling", "extra GiB"]
    rows = []
    for _, d in runs:
        run = _run_cells(d) + [f"{d.get('batch', '-')} x {d.get('length', '-')}, {d.get('hidden', '-')}, "
                               f"{d.get('vocab', '-')}", str(d.get("dtype", "-"))]
        for r in d.get("results", []):
            if "error" in r:
                rows.append(run + [r.get("provider", "?")] + _failed(r, 3))
                continue
            rows.append(run + [r["provider"], _num(r.get("median_ms"), "{:.2f}"),
                               _pct(r.get("fraction_of_matmul_ceiling")), _num(r.get("extra_peak_gib"), "{:.2f}")])
    return ["### SUBS loss stage, forward + backward (`bench/bench_linear_ce.py`)", "",
            "GEMM FLOPs on the masked rows against the matmul ceiling measured in the same run.", ""] \
        + _table(head, rows)


def blocks_section(runs):
    khead = RUN + ["B x L", "dtype", "kernel", "ms", "GB/s", "% of copy bandwidth", "backend"]
    mhead = RUN + ["preset", "B x L", "provider", "ms", "tokens/s"]
    krows, mrows = [], []
    for _, d in runs:
        bw = d.get("copy_bandwidth_Bps")
        shape = f"{d.get('kernel_batch', d.get('batch', '-'))} x {d.get('length', '-')}"
        run = _run_cells(d)
        for r in d.get("kernels", []):
            frac = r.get("fraction_of_copy")
            if frac is None and r.get("GBps") is not None and bw:
                frac = r["GBps"] * 1e9 / bw
            krows.append(run + [shape, str(d.get("dtype", "-")).replace("torch.", ""), r.get("kernel", "?"),
                                _num(r.get("ms"), "{:.3f}"), _num(r.get("GBps"), "{:,.0f}"), _pct(frac),
                                str(r.get("backend") or "-")])
        for r in d.get("model", []):
            base = run + [str(d.get("preset", "-")), f"{d.get('batch', '-')} x {d.get('length', '-')}",
                          r.get("provider", "?")]
            mrows.append(base + (_failed(r, 2) if "error" in r else
                                 [_num(r.get("ms"), "{:.1f}"), _num(r.get("tokens_per_s"), "{:,.0f}")]))
    out = ["### DiT block kernels (`bench/bench_blocks.py`)", "",
           "Memory-bound kernels: bytes read and written once, against the copy bandwidth measured in the same "
           "run (fwd+bwd rows: time only).", ""] + _table(khead, krows)
    out += ["", "DiT forward + backward without the loss:", ""] + _table(mhead, mrows)
    return out


def _sampling_blocks(d):
    """(source, sampling dict) of a sampling JSON or of a throughput JSON's sampling section."""
    if d.get("benchmark") == "sampling":
        return "bench_sampling.py", d
    s = d.get("sampling")
    if isinstance(s, dict) and "error" not in s:
        return "throughput.py", s
    return None, None


def sampling_section(runs):
    shead = RUN + ["source", "B x L, V", "masked rows", "provider", "ms per step", "% of copy bandwidth (read)"]
    ghead = RUN + ["source", "preset", "B x L", "steps", "sampler", "seconds", "generated tokens/s",
                   "model calls", "sample entropy", "gen PPL"]
    srows, grows = [], []
    for _, d in runs:
        src, s = _sampling_blocks(d)
        if s is None:
            continue
        run = _run_cells(d) + [src]
        bw = s.get("copy_bandwidth_Bps")
        for r in s.get("step", []):
            frac = r.get("fraction_of_copy")
            if frac is None and r.get("read_GBps") is not None and bw:
                frac = r["read_GBps"] * 1e9 / bw
            srows.append(run + [f"{s.get('batch', '-')} x {s.get('length', '-')}, {s.get('vocab', '-')}",
                                str(s.get("masked_rows", "-")), r.get("provider", "?"), _num(r.get("ms"), "{:.3f}"),
                                _pct(frac)])
        for r in s.get("generation", []):
            grows.append(run + [str(s.get("preset", "-")), f"{s.get('batch', '-')} x {s.get('length', '-')}",
                                str(s.get("steps", "-")), r.get("provider", "?"), _num(r.get("seconds"), "{:.2f}"),
                                _num(r.get("tokens_per_s"), "{:,.0f}"),
                                "-" if r.get("model_calls") is None else str(r["model_calls"]),
                                _num(r.get("entropy"), "{:.3f}"), _num(r.get("gen_ppl"), "{:.2f}")])
    out = ["### Sampling (`bench/bench_sampling.py`, sampling section of `bench/throughput.py`)", "",
           "Step arithmetic after the model forward (half the positions masked):", ""] + _table(shead, srows)
    out += ["", "Generation from scratch (randomly initialised model unless the preset names a checkpoint; `steps` "
            "applies to ddpm_cache; sample entropy: mean unigram entropy of the samples, nats):", ""] \
        + _table(ghead, grows)
    return out


def make_table(runs) -> str:
    """The Markdown block for the README (``NO_RUN`` when ``runs`` is empty)."""
    if not runs:
        return NO_RUN
    by_kind = {k: [] for k in ("throughput", "linear_ce", "blocks", "sampling")}
    for name, d in runs:
        kind = KINDS.get(d.get("benchmark"))
        if kind is None:
            print(f"warning: {name}: unknown benchmark kind {d.get('benchmark')!r}, skipped", file=sys.stderr)
            continue
        by_kind[kind].append((name, d))
        if kind == "throughput" and _sampling_blocks(d)[1] is not None:
            by_kind["sampling"].append((name, d))
    parts = ["Generated by `python bench/make_readme_table.py --update README.md` from the GPU runs in "
             "`bench/results/`."]
    for kind, fn in (("throughput", throughput_section), ("linear_ce", linear_ce_section),
                     ("blocks", blocks_section), ("sampling", sampling_section)):
        if by_kind[kind]:
            parts.append("\n".join(fn(by_kind[kind])))
    if len(parts) == 1:
        return NO_RUN
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------- updating
def replace_block(text: str, block: str, where: str = "the file") -> str:
    """``text`` with the lines between the START and END marker lines replaced by ``block``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == START]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise MarkerError(
            f"{where} must contain the marker lines {START!r} and {END!r}, once each, start before end "
            f"(found {len(starts)} start and {len(ends)} end marker line(s)); add them where the performance "
            "table belongs")
    s, e = starts[0], ends[0]
    nl = "\r\n" if lines[s].endswith("\r\n") else "\n"
    body = block.replace("\n", nl).rstrip(nl) + nl
    return "".join(lines[:s + 1]) + nl + body + nl + "".join(lines[e:])


def update_file(path, block: str) -> bool:
    """Rewrite ``path`` with ``block`` between the markers; True when the file changed."""
    path = Path(path)
    old = path.read_text()
    new = replace_block(old, block, str(path))
    if new != old:
        path.write_text(new)
    return new != old


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the JSON results")
    p.add_argument("--update", metavar="FILE", default=None,
                   help=f"replace the block between {START} and {END} in FILE instead of printing")
    args = p.parse_args(argv)
    block = make_table(load_gpu_runs(args.results))
    if args.update is None:
        print(block)
        return 0
    try:
        changed = update_file(args.update, block)
    except (MarkerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'updated' if changed else 'unchanged'}: {args.update}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
