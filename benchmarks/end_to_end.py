"""End to end: training-step throughput (tokens/s) and compile time of real models.

HF GPT-2 small (seq 1024, batch 8), BERT-base (seq 512, batch 16) and ViT-B/16 (224px, 197 tokens,
batch 64; HF, or timm if HF's ViT cannot be imported), built from configs (random weights, no
downloads), trained with AdamW under bf16 autocast, dropout as in the configs. Variants:

    eager          attn_implementation="eager", no compile
    flashfuse      attn_implementation="eager", torch.compile(backend="flashfuse")
    sdpa+inductor  attn_implementation="sdpa",  torch.compile() (Inductor)
    inductor       attn_implementation="eager", torch.compile() (Inductor)

Rows: impl is eager / flashfuse / inductor; `variant` and `attn_implementation` tell the two
Inductor rows apart. compile_s = warm-up time minus the same number of steady steps.
`fused` = regions flashfuse fused (torch._dynamo.utils.counters["flashfuse"]["fused"]).

    python benchmarks/end_to_end.py --quick        # GPT-2 only
    python benchmarks/end_to_end.py                # GPT-2, BERT, ViT
"""

from __future__ import annotations

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Budget, base_row, cleanup, describe_error, fmt, goal, goals_markdown, md_table, sync, time_limit  # noqa: E402

SUITE = "end_to_end"
MODELS = ("gpt2", "bert", "vit")
# (variant, impl, attn_implementation, compiler)
VARIANTS = (
    ("eager", "eager", "eager", None),
    ("flashfuse", "flashfuse", "eager", "flashfuse"),
    ("sdpa+inductor", "inductor", "sdpa", "inductor"),
    ("inductor", "inductor", "eager", "inductor"),
)
GOALS = (("sdpa+inductor", 1.0), ("eager", 3.0))
COMPILE_TARGET = 1.2


def add_args(p) -> None:
    p.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS) + " (default: gpt2 quick, all full)")
    p.add_argument("--variants", default=None, help="comma list of " + ",".join(v[0] for v in VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (the first one compiles)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--compiler", default=None, choices=("inductor", "aot_eager"),
                   help="what the compiled variants lower to (default inductor; aot_eager in the dry run, to keep CPU runs short)")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse the Inductor/Triton caches (default: each compiled variant compiles in a fresh cache dir, so compile times are cold)")


# --------------------------------------------------------------------------------------------
# models

def _hf_model(cls, cfg, attn: str):
    try:
        model = cls._from_config(cfg, attn_implementation=attn)
    except TypeError:
        cfg._attn_implementation = attn
        model = cls(cfg)
    got = getattr(model.config, "_attn_implementation", None)
    if got != attn and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
        got = getattr(model.config, "_attn_implementation", None)
    if got != attn:
        raise RuntimeError(f"asked for attn_implementation={attn!r}, the model has {got!r}")
    return model


def _quiet_transformers():
    # A CUDA torchvision wheel beside a CPU torch breaks `import transformers` (tests/models.py)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import models

    models._torchvision_shim()
    import transformers

    try:
        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    return transformers


def build(name: str, attn: str, tiny: bool, device: str, batch: int | None):
    """(model, batch dict, loss_fn, info). Random weights from a config: nothing is downloaded."""
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    if name == "gpt2":
        tf = _quiet_transformers()
        kw = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64) if tiny else dict(n_positions=1024)
        cfg = tf.GPT2Config(**kw)
        b, n = (2, 64) if tiny else (8, 1024)
        b = batch or b
        model = _hf_model(tf.GPT2LMHeadModel, cfg, attn)
        ids = torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)
        data = {"input_ids": ids, "labels": ids}
        info = dict(B=b, N=n, H=cfg.n_head, D=cfg.n_embd // cfg.n_head, causal=True, dropout=cfg.attn_pdrop, tokens=b * n, source="transformers")
        return model, data, (lambda m, d: m(**d).loss), info
    if name == "bert":
        tf = _quiet_transformers()
        kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=512,
                  max_position_embeddings=128) if tiny else {}
        cfg = tf.BertConfig(**kw)
        b, n = (2, 64) if tiny else (16, 512)
        b = batch or b
        model = _hf_model(tf.BertForMaskedLM, cfg, attn)
        ids = torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)
        data = {"input_ids": ids, "labels": ids}
        info = dict(B=b, N=n, H=cfg.num_attention_heads, D=cfg.hidden_size // cfg.num_attention_heads, causal=False,
                    dropout=cfg.attention_probs_dropout_prob, tokens=b * n, source="transformers")
        return model, data, (lambda m, d: m(**d).loss), info
    if name == "vit":
        img, patch = (32, 8) if tiny else (224, 16)
        b = batch or (2 if tiny else 64)
        n = (img // patch) ** 2 + 1
        pixels = torch.randn(b, 3, img, img, generator=g).to(device)
        hf_err = None
        try:
            tf = _quiet_transformers()
            kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else {}
            cfg = tf.ViTConfig(image_size=img, patch_size=patch, num_labels=10 if tiny else 1000, **kw)
            model = _hf_model(tf.ViTForImageClassification, cfg, attn)
            labels = torch.randint(0, cfg.num_labels, (b,), generator=g).to(device)
            info = dict(B=b, N=n, H=cfg.num_attention_heads, D=cfg.hidden_size // cfg.num_attention_heads, causal=False,
                        dropout=cfg.attention_probs_dropout_prob, tokens=b * n, images=b, source="transformers")
            return model, {"pixel_values": pixels, "labels": labels}, (lambda m, d: m(**d).loss), info
        except Exception as e:  # noqa: BLE001  (fall back to timm)
            hf_err = describe_error(e)
        try:
            import timm
            from timm.models.vision_transformer import VisionTransformer
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ViT: transformers failed ({hf_err}) and timm cannot be imported ({describe_error(e)})") from None
        if tiny:
            model = VisionTransformer(img_size=img, patch_size=patch, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        else:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
        fused = attn == "sdpa"
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = fused
        heads = model.blocks[0].attn.num_heads
        dim = model.embed_dim
        labels = torch.randint(0, model.num_classes, (b,), generator=g).to(device)
        info = dict(B=b, N=n, H=heads, D=dim // heads, causal=False, dropout=float(getattr(model.blocks[0].attn.attn_drop, "p", 0.0)),
                    tokens=b * n, images=b, source=f"timm (HF ViT failed: {hf_err})")
        return model, {"x": pixels, "y": labels}, (lambda m, d: F.cross_entropy(m(d["x"]), d["y"])), info
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


# --------------------------------------------------------------------------------------------
# one (model, variant) cell

def _launch_module():
    try:  # needs triton
        from flashfuse.kernels import launch
    except ImportError:
        return None
    return launch


def _launch_paths() -> dict:
    return dict(getattr(_launch_module(), "stats", {}))


def _autotune_choices() -> list:
    return list(getattr(_launch_module(), "choices", []))


def _counter_totals():
    from torch._dynamo.utils import counters

    return (int(counters["flashfuse"]["fused"]), int(sum(counters["graph_break"].values())),
            int(counters["stats"]["unique_graphs"]), int(counters["flashfuse"]["kernel_fallback"]))


def _compile_cache(fresh: bool):
    """A fresh Inductor/Triton cache dir (torch._inductor.utils.fresh_cache) so that every compiled
    variant's compile time is a cold one, whatever ran before in this process or machine."""
    import contextlib

    if not fresh:
        return contextlib.nullcontext()
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:
        try:
            from torch._inductor.utils import fresh_inductor_cache as fresh_cache
        except ImportError:
            return contextlib.nullcontext()
    return fresh_cache()


def measure(name, variant, impl, attn, compiler, args, runner_budget: Budget, tiny: bool, steps: int, warm: int) -> dict:
    dev = args.device
    row = base_row(SUITE, impl, None, model=name, variant=variant, attn_implementation=attn, dtype="bf16-autocast")
    model = opt = data = None
    try:
        with time_limit(max(1.0, min(args.cell_timeout_s or (240.0 if tiny else 420.0), runner_budget.left() + 5.0))):
            model, data, loss_fn, info = build(name, attn, tiny, dev, args.batch)
            row.update(B=info["B"], N=info["N"], H=info["H"], D=info["D"], causal=info["causal"], dropout=info["dropout"],
                       tokens_per_step=info["tokens"], source=info["source"])
            model = model.to(dev).train()
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=(dev == "cuda"))
            inner = args.compiler or ("aot_eager" if tiny else "inductor")
            if compiler == "flashfuse":
                importlib.import_module("flashfuse")  # registers the backend

                cmodel = torch.compile(model, backend="flashfuse", options={"compiler": inner, "kernel": args.kernel})
            elif compiler == "inductor":
                cmodel = torch.compile(model) if inner == "inductor" else torch.compile(model, backend=inner)
            else:
                cmodel = model
            if compiler:
                row["compiler"] = inner

            def step():
                with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                    loss = loss_fn(cmodel, data)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            c0 = _counter_totals()
            choices0 = len(_autotune_choices())
            sync(dev)
            with _compile_cache(bool(compiler) and not args.warm_cache):
                t0 = time.perf_counter()
                step()
                sync(dev)
                row["first_step_s"] = round(time.perf_counter() - t0, 3)
                for _ in range(warm - 1):
                    step()
                sync(dev)
                warm_s = time.perf_counter() - t0
            c1 = _counter_totals()
            row["fused"] = c1[0] - c0[0] if compiler == "flashfuse" else None
            row["graph_breaks"] = c1[1] - c0[1]
            row["graphs"] = c1[2] - c0[2]
            row["kernel_fallbacks"] = c1[3] - c0[3]  # Triton failures run by the reference kernel (slow)
            if compiler == "flashfuse":
                refused = common.flashfuse_refusals()
                if refused:
                    row["flashfuse_counters"] = refused
            launches0 = _launch_paths()
            if compiler == "flashfuse":  # the configs autotuning chose for this model, to compare runs
                row["autotune_choices"] = [f"{n} {k} -> {c}" for n, k, c in _autotune_choices()[choices0:]]
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            sync(dev)
            step_s = (time.perf_counter() - t0) / steps
            if compiler == "flashfuse":  # how the timed steps launched the kernels (all "direct" when warm)
                row["launch_paths"] = {k: v - launches0.get(k, 0) for k, v in _launch_paths().items()}
            row["loss"] = float(loss.detach().float().item())
            loss = None
            row["step_ms"] = step_s * 1e3
            row["tokens_per_s"] = info["tokens"] / step_s
            if "images" in info:
                row["images_per_s"] = info["images"] / step_s
            row["compile_s"] = round(max(0.0, warm_s - warm * step_s), 3) if compiler else 0.0
            row["approx_tflops"] = 6.0 * row["params_m"] * 1e6 * info["tokens"] / step_s / 1e12
            row["peak_mb"], _ = common.peak_memory_mb(step, dev)
    except (Exception, common.CellTimeout) as e:  # noqa: BLE001
        row["error"] = describe_error(e)
    finally:
        model = opt = data = cmodel = None  # noqa: F841
        torch._dynamo.reset()
        cleanup(dev)
    return row


def run(args, budget: Budget, sink) -> None:
    tiny = args.dry_run
    if args.models:
        models = args.models.split(",")
    else:
        models = ["gpt2"] if args.quick and not tiny else list(MODELS)
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    if tiny:
        steps, warm = 2, 2
    elif args.quick:
        steps, warm = 10, 3
    else:
        steps, warm = 20, 5
    steps = args.steps or steps
    warm = max(1, args.warmup_steps or warm)
    broken = None
    for name in models:
        for variant, impl, attn, compiler in variants:
            if broken:
                row = base_row(SUITE, impl, None, model=name, variant=variant, attn_implementation=attn, error=f"skipped: CUDA context broke earlier ({broken[:100]})")
            elif budget.expired():
                row = base_row(SUITE, impl, None, model=name, variant=variant, attn_implementation=attn, error="skipped: time budget")
            else:
                row = measure(name, variant, impl, attn, compiler, args, budget, tiny, steps, warm)
                if row.get("error") and common.breaks_context(row["error"]) and args.device == "cuda":
                    broken = row["error"]
            sink.add(row)


# --------------------------------------------------------------------------------------------
# goals, tables, plot

def _by_model(rows):
    out = {}
    for r in rows:
        if r.get("suite") == SUITE and r.get("model"):
            out.setdefault(r["model"], {})[r.get("variant")] = r
    return out


def compute_goals(rows) -> list:
    goals = []
    for model, vs in _by_model(rows).items():
        ff = vs.get("flashfuse") or {}
        for peer, thr in GOALS:
            pr = vs.get(peer) or {}
            val = ff["tokens_per_s"] / pr["tokens_per_s"] if ff.get("tokens_per_s") and pr.get("tokens_per_s") else None
            note = f"flashfuse fused {ff.get('fused')} regions" if ff.get("fused") is not None else ""
            goals.append(goal(f"e2e {model} tokens/s vs {peer}", f">= {thr}x", ">=", thr, {"flashfuse": val}, int(val is not None), "", note))
        ind = vs.get("inductor") or {}
        val = ff["compile_s"] / ind["compile_s"] if ff.get("compile_s") is not None and ind.get("compile_s") else None
        goals.append(goal(f"e2e {model} compile time vs inductor", f"<= {COMPILE_TARGET}x", "<=", COMPILE_TARGET, {"flashfuse": val}, int(val is not None),
                          f"{fmt(ff.get('compile_s'))}s vs {fmt(ind.get('compile_s'))}s" if val is not None else ""))
    return goals


def render_markdown(rows, goals, meta) -> str:
    rows = [r for r in rows if r.get("suite") == SUITE]
    out = [f"# End to end ({meta.get('mode')})", "",
           f"GPU: {meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | commit {meta.get('git_commit')} | {meta.get('date')}", "",
           "Training step (fwd + bwd + AdamW) under bf16 autocast, random weights, dropout as configured. "
           "compile_s = warm-up time minus the same number of steady steps.", ""]
    table = []
    for r in rows:
        table.append([r.get("model"), r.get("variant"), r.get("attn_implementation"), r.get("B"), r.get("N"),
                      fmt(r.get("step_ms"), 1), fmt(r.get("tokens_per_s"), 0), fmt(r.get("compile_s"), 1),
                      fmt(r.get("peak_mb"), 0), "" if r.get("fused") is None else r["fused"], "" if r.get("graph_breaks") is None else r["graph_breaks"],
                      (r.get("error") or "")[:160]])
    out += [md_table(["model", "variant", "attn", "B", "seq", "step ms", "tokens/s", "compile s", "peak MB", "fused", "graph breaks", "error"], table), ""]
    out += ["## Goals (ratios of flashfuse to the peer)", "", goals_markdown(goals), ""]
    return "\n".join(out)


def plot(rows, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_model(rows)
    if not by:
        return
    names = [v[0] for v in VARIANTS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(names)
    models = list(by)
    for j, vname in enumerate(names):
        for ax, field, scale in ((axes[0], "tokens_per_s", 1e3), (axes[1], "compile_s", 1.0)):
            xs, ys = [], []
            for i, m in enumerate(models):
                r = by[m].get(vname) or {}
                if r.get(field) is not None:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(r[field] / scale)
            ax.bar(xs, ys, width=width, label=vname, color=plt.cm.tab10(j))
    for ax, title in ((axes[0], "training throughput (k tokens/s)"), (axes[1], "compile time (s)")):
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"flashfuse end to end — {meta.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
