"""Profile a few training steps of HF GPT-2 (eager attention) under a compiler: where does the time go?

    python benchmarks/profile_step.py --backend flashfuse --layers 4
    python benchmarks/profile_step.py --backend flashfuse --model vit     # end_to_end.py's ViT-B/16
Prints wall time per step, the GPU's busy time, and the top ops by self CUDA and self CPU time.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="flashfuse")
    p.add_argument("--model", default="gpt2", choices=("gpt2", "bert", "vit"), help="gpt2 (sized by the flags below) or an end_to_end model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--attn", default="eager", choices=("eager", "sdpa"), help="HF attn_implementation (sdpa + --backend inductor: the peer)")
    p.add_argument("--stacks", default="", help="comma-separated op names (aten::arange,...): print the Python stacks that call them")
    p.add_argument("--sync-debug", action="store_true", help="one step under torch.cuda.set_sync_debug_mode('warn'): prints every host sync")
    args = p.parse_args()

    import transformers

    import flashfuse  # noqa: F401

    logging.basicConfig(level=logging.WARNING)  # kernel fallbacks are logged as warnings

    if args.model == "gpt2":
        cfg = transformers.GPT2Config(n_layer=args.layers, n_positions=args.seq, attn_implementation=args.attn,
                                      attn_pdrop=args.dropout, resid_pdrop=args.dropout, embd_pdrop=args.dropout)
        model = transformers.GPT2LMHeadModel(cfg).cuda().train()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
        data, loss_fn = {"input_ids": ids, "labels": ids}, (lambda m, d: m(**d).loss)
    else:  # the end-to-end suite's model, full size (--layers, --seq, --dropout do not apply)
        import end_to_end

        model, data, loss_fn, _ = end_to_end.build(args.model, args.attn, False, "cuda", None)
        model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model, backend=args.backend)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(compiled, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    print(f"warm-up (compile) {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    stack_ops = {n for n in args.stacks.split(",") if n}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                with_stack=bool(stack_ops),
                                # Python frames reach FunctionEvent.stack only in verbose mode
                                experimental_config=torch._C._profiler._ExperimentalConfig(verbose=bool(stack_ops))) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: aten ops' self device time repeats their kernels'
    gpu_ms = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / args.steps
    print(f"{args.backend}: {wall:.1f} ms/step wall, GPU busy {gpu_ms:.1f} ms/step, layers={args.layers}")
    from torch._dynamo.utils import counters

    from flashfuse.kernels import launch

    print("flashfuse counters:", dict(counters["flashfuse"]), "launch paths:", launch.stats)
    print("dynamo counters:", {k: dict(counters[k]) for k in ("stats", "graph_break", "recompiles") if counters[k]})
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if stack_ops:
        _print_stacks(prof, stack_ops, args.steps)


def _print_stacks(prof, names: set, steps: int) -> None:
    """Calls per step of each named op, grouped by the innermost Python frames that issued them."""
    import collections

    by_stack = collections.Counter()
    for e in prof.events():
        if e.name in names:
            frames = [f for f in e.stack if "torch/profiler" not in f][:10]
            by_stack[(e.name, tuple(frames))] += 1
    for (name, frames), count in by_stack.most_common(12):
        print(f"--- {name}: {count / steps:.1f} calls/step")
        for f in frames:
            print("      ", f)


if __name__ == "__main__":
    main()
