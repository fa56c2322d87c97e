"""``mdlm.train.Trainer`` end to end without the shipped corpora: a synthetic corpus, a run, a resume.

For the GPU check (the device machine may not have ``shared/data``) and as a CPU smoke test. The corpus is
built from 64 random "phrases" of 8 GPT-2 token ids (vocabulary 50258 with MASK); each block is a random
sequence of phrases, so a model can learn it within a few dozen steps (a real drop of the validation
NELBO, unlike uniform random tokens). The run trains ``--steps // 2`` steps, stops (as if interrupted), is
resumed from its checkpoint by a new ``Trainer`` and trains to ``--steps``. Reported: the device and
strategy, tokens/s over the logged steps, the validation NELBO (EMA weights) at step 0 and at the end, and
whether the resumed run continued from the saved step. On CUDA the fused block kernels and the fused loss
run (the trainer's defaults).

    python bench/train_smoke.py --steps 60 --out OUT_DIR [key=value overrides]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import mdlm
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    import mdlm
from mdlm.config import apply_overrides
from mdlm.train import Trainer

V = 50258                # GPT-2 + MASK
PHRASES, PHRASE_LEN = 64, 8


def synthetic_blocks(n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) int64 blocks: random sequences of 64 fixed random phrases of 8 ids < 50257."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, V - 1, (PHRASES, PHRASE_LEN), generator=torch.Generator().manual_seed(1234))
    per_block = -(-length // PHRASE_LEN)
    pick = torch.randint(0, PHRASES, (n, per_block), generator=g)
    return phrases[pick].reshape(n, per_block * PHRASE_LEN)[:, :length].contiguous()


def run(args, overrides: list[str]) -> dict:
    cfg = mdlm.preset(args.preset, **{"model.length": args.length, "loader.global_batch_size": args.batch,
                                      "trainer.max_steps": args.steps // 2, "trainer.save_every": 0,
                                      "trainer.val_every": 0, "trainer.log_every": 5, "trainer.val_blocks": 64,
                                      "trainer.num_samples": 0, "lr_scheduler.warmup_steps": 10,
                                      "optim.lr": 1e-3, "trainer.progress": False,
                                      "trainer.out_dir": str(Path(args.out) / "train_smoke")})
    apply_overrides(cfg, overrides)
    train = synthetic_blocks(4096, args.length, 0)
    val = synthetic_blocks(64, args.length, 1)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)

    t0 = time.perf_counter()
    first = Trainer(cfg, train, val, model=mdlm.MDLM(cfg, V), resume="never", log=log)
    start_val = first.validate()
    first.fit()                                   # to max_steps // 2, then saves (as an interrupted run would)
    saved_step = first.state.step
    del first
    cfg.trainer.max_steps = args.steps
    second = Trainer(cfg, train, val, model=mdlm.MDLM(cfg, V), resume="auto", log=log)
    resumed_at = second.state.step
    summary = second.fit()
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (Path(cfg.trainer.out_dir) / "log.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r][1:]   # the first interval includes warm-up
    return {
        "device": str(second.device), "strategy": second.strategy, "preset": args.preset,
        "use_kernels": second.model.backbone.kernels_enabled(torch.empty(0, device=second.device)),
        "steps": args.steps, "batch": args.batch, "length": args.length,
        "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "val_nelbo_start": start_val["val_nelbo"], "val_nelbo_end": summary["val_nelbo"],
        "saved_step": saved_step, "resumed_at": resumed_at, "final_step": summary["step"],
        "nonfinite_steps": summary["nonfinite_total"], "wall_s": wall,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (half before the resume, half after)")
    res = run(args, args.overrides)
    ok = (res["resumed_at"] == res["saved_step"] and res["final_step"] == args.steps
          and math.isfinite(res["val_nelbo_end"]))
    res["ok"] = ok
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"train_smoke_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"trainer smoke run on {res['device']} ({res['gpu'] or 'CPU'}), kernels {res['use_kernels']}: "
          f"{res['tokens_per_s_median'] or float('nan'):,.0f} tokens/s, val NELBO {res['val_nelbo_start']:.3f} -> "
          f"{res['val_nelbo_end']:.3f}, saved at {res['saved_step']}, resumed at {res['resumed_at']}, "
          f"finished at {res['final_step']}: {'ok' if ok else 'FAILED'} (wrote {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
