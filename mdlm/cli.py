"""The ``mdlm`` command: ``mdlm train``, ``mdlm eval``, ``mdlm sample`` (``python -m mdlm ...`` too)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "sample_main"]

_USAGE = """usage: mdlm <command> [options]

commands:
  train    train an MDLM (published recipe, fused kernels, resumable; torchrun for several processes);
           `mdlm train --quick`: a CPU-sized run that finishes in minutes
  eval     validation / zero-shot perplexity (NELBO), BPD, generative perplexity of samples
  sample   generate text from a checkpoint (a file, a run folder or a Hugging Face snapshot folder)

`mdlm <command> --help` for the options of each."""


def sample_main(argv: list[str] | None = None) -> int:
    """``mdlm sample``: generate from a checkpoint -- a training checkpoint or run folder of this library (it
    describes its model: no --preset needed), a Hugging Face snapshot folder (kuleshov-group/mdlm-owt layout), or
    a published Lightning file (give --preset / --data / overrides as trained)."""
    import torch

    from .checkpoint import CheckpointError, load_model
    from .samplers import sample

    p = argparse.ArgumentParser(prog="mdlm sample", description=sample_main.__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a training run folder (its newest checkpoint), or a Hugging Face "
                        "snapshot folder in the kuleshov-group/mdlm-owt layout")
    p.add_argument("--preset", default=None,
                   help="only for checkpoints that do not describe their model (published Lightning files): the "
                        "model preset it was trained with (default small)")
    p.add_argument("--data", default=None,
                   help="likewise: the dataset preset it was trained with (sets the tokenizer and length)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled non-tensor objects (published Lightning .ckpt files hold a config)")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default config.sampling.steps)")
    p.add_argument("--sampler", default=None, help="ddpm | ddpm_cache | first_hitting | confidence | analytic")
    p.add_argument("--impl", default="auto", choices=("auto", "fused", "reference"),
                   help="fused samplers where they apply (auto), or force one implementation")
    p.add_argument("--temperature", type=float, default=None, help="fused samplers: p_theta^(1/T)")
    p.add_argument("--top-k", type=int, default=None, help="fused samplers: keep the k most probable tokens")
    p.add_argument("--top-p", type=float, default=None, help="fused samplers: nucleus mass in (0, 1]")
    p.add_argument("--tokens-per-step", type=int, default=None, help="confidence decoding: k tokens per step")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="confidence decoding: commit every token above this probability (at least one)")
    p.add_argument("--remask-eta", type=float, default=None, help="ddpm*: ReMDM remasking strength in [0, 1]")
    p.add_argument("--cuda-graph", action="store_true", help="first_hitting on CUDA: replay events from a graph")
    p.add_argument("--num-strides", type=int, default=None,
                   help="semi-autoregressive: generate L + num_strides * stride_length tokens")
    p.add_argument("--stride-length", type=int, default=None, help="semi-autoregressive stride (tokens)")
    p.add_argument("--prefix", default=None, help="text every sample starts with (kept as given tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default=None, help="also write the samples (ids and text) to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    from .data import decode, get_tokenizer

    def fail(msg) -> int:
        print(f"mdlm sample: error: {msg}", file=sys.stderr)
        return 2

    try:
        from .config import apply_overrides, preset
        apply_overrides(preset(args.preset or "small"), args.overrides)     # unknown keys / bad values first
        model, info = load_model(args.checkpoint, args.preset, args.data, args.overrides, use_ema=not args.no_ema,
                                 weights_only=not args.trust_checkpoint)
        cfg = model.config
        if not info["tokenizer"]:
            return fail(f"{info['path']} does not name its tokenizer: samples cannot be decoded")
        tok = get_tokenizer(info["tokenizer"])
    except KeyError as e:
        return fail(e.args[0] if e.args else e)
    except (CheckpointError, OSError, ImportError, ValueError) as e:
        return fail(e)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    opts = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                              ("tokens_per_step", args.tokens_per_step),
                              ("confidence_threshold", args.confidence_threshold),
                              ("remask_eta", args.remask_eta), ("num_strides", args.num_strides),
                              ("stride_length", args.stride_length)) if v is not None}
    if args.cuda_graph:
        opts["cuda_graph"] = True
    if args.prefix is not None:
        if args.num_strides:
            return fail("--prefix is not supported with semi-autoregressive sampling (--num-strides)")
        ids = tok.encode(args.prefix)
        L = int(cfg.model.length)
        if not 0 < len(ids) < L:
            return fail(f"--prefix must encode to 1..{L - 1} tokens (the sequence length is {L}), got {len(ids)}")
        x_init = torch.full((args.num, L), model.mask_index, dtype=torch.int64, device=device)
        x_init[:, :len(ids)] = torch.tensor(ids, dtype=torch.int64, device=device)
        opts["x_init"] = x_init
    fused_only = {"temperature", "top_k", "top_p", "tokens_per_step", "confidence_threshold", "remask_eta",
                  "cuda_graph"} & set(opts)
    if fused_only and args.impl == "reference":
        return fail(f"{', '.join('--' + k.replace('_', '-') for k in sorted(fused_only))} need the fused samplers "
                    "(not --impl reference)")
    impl = "fused" if fused_only and args.impl == "auto" else args.impl
    try:
        x = sample(model, args.num, steps=args.steps, sampler=args.sampler, impl=impl, generator=gen,
                   progress=True, **opts)
    except ValueError as e:
        return fail(e)
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
