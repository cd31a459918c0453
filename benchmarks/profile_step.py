"""Profile a few training steps of HF GPT-2 (eager attention) under a compiler: where does the time go?

    python benchmarks/profile_step.py --backend flashfuse --layers 4
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
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--attn", default="eager", choices=("eager", "sdpa"), help="HF attn_implementation (sdpa + --backend inductor: the peer)")
    args = p.parse_args()

    import transformers

    import flashfuse  # noqa: F401

    logging.basicConfig(level=logging.WARNING)  # kernel fallbacks are logged as warnings

    cfg = transformers.GPT2Config(n_layer=args.layers, n_positions=args.seq, attn_implementation=args.attn,
                                  attn_pdrop=args.dropout, resid_pdrop=args.dropout, embd_pdrop=args.dropout)
    model = transformers.GPT2LMHeadModel(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model, backend=args.backend)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, labels=ids).loss
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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    print(f"{args.backend}: {wall:.1f} ms/step wall, GPU busy {gpu_ms:.1f} ms/step, layers={args.layers}")
    from torch._dynamo.utils import counters

    from flashfuse.kernels import launch

    print("flashfuse counters:", dict(counters["flashfuse"]), "launch paths:", launch.stats)
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
