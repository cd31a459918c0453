"""flashfuse demo: compile a small GPT with hand-written attention, show what was fused, check it.

    python examples/demo.py
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.testing import assert_matches_eager


class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads, seq, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_drop(att)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, width, heads, seq, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, seq, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, width=64, heads=4, layers=2, seq=64, dropout=0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads, seq, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT().to(device)
    idx = torch.randint(0, 256, (4, 64), device=device)

    print(f"device: {device}")
    report = flashfuse.explain(model, idx)
    print(report)
    assert len(report.fused) == 2, "expected both attention layers to be fused"

    # Train mode with dropout p = 0 and eval mode: outputs and gradients match eager.
    for mode, p in (("train", 0.0), ("eval", 0.1)):
        m = GPT(dropout=p).to(device).train(mode == "train")
        assert_matches_eager(m, idx)
        print(f"{mode} mode (dropout p={p}): compiled output and gradients match eager")

    # Train mode with dropout: one training step through the fused dropout.
    compiled = torch.compile(model, backend="flashfuse")
    loss = F.cross_entropy(compiled(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    print(f"train step with dropout 0.1: loss {loss.item():.4f}, grads finite: {all(p.grad.isfinite().all() for p in model.parameters())}")
    print("demo OK")


if __name__ == "__main__":
    main()
