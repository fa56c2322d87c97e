"""The ``mdlm`` command: ``mdlm train``, ``mdlm eval``, ``mdlm sample`` (``python -m mdlm ...`` too)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "sample_main"]

_USAGE = """usage: mdlm <command> [options]

commands:
  train    train an MDLM (published recipe, fused kernels, resumable; torchrun for several processes)
  eval     validation / zero-shot perplexity (NELBO), BPD, generative perplexity of samples
  sample   generate text from a checkpoint

`mdlm <command> --help` for the options of each."""


def sample_main(argv: list[str] | None = None) -> int:
    """``mdlm sample``: generate from a checkpoint (published Lightning layout or a training checkpoint)."""
    import torch

    from .checkpoint import CheckpointError, load_published_checkpoint
    from .config import apply_overrides, preset
    from .diffusion import MDLM
    from .samplers import sample

    p = argparse.ArgumentParser(prog="mdlm sample", description=sample_main.__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default=None, help="dataset preset (sets the tokenizer and length)")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default config.sampling.steps)")
    p.add_argument("--sampler", default=None, help="ddpm | ddpm_cache | first_hitting | confidence | analytic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default=None, help="also write the samples (ids and text) to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    from .data import decode, get_tokenizer
    try:
        cfg = apply_overrides(preset(args.preset, data=args.data), args.overrides)
        tok = get_tokenizer(cfg.data.tokenizer)
        model = MDLM(cfg, tok.model_vocab_size, mask_index=tok.mask_id)
        load_published_checkpoint(model, args.checkpoint, use_ema=not args.no_ema)
    except (CheckpointError, OSError, ImportError, ValueError, KeyError) as e:
        print(f"mdlm sample: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = sample(model, args.num, steps=args.steps, sampler=args.sampler, generator=gen, progress=True)
    texts = decode(x.cpu(), tok, mask_index=model.mask_index)
    for i, t in enumerate(texts):
        print(f"--- sample {i}\n{t}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"ids": row, "text": t} for row, t in zip(x.tolist(), texts)], f)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as train_main
        return train_main(rest)
    if cmd == "eval":
        from .eval import main as eval_main
        return eval_main(rest)
    if cmd == "sample":
        return sample_main(rest)
    print(f"mdlm: unknown command {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
