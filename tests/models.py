"""Tiny model builders for the model tests and benchmarks/model_table.py.

Hugging Face transformers and timm models built from configs (random weights, nothing is
downloaded): 2 layers, hidden 32-64, head dim 16, sequence length 8, eager attention. Each
`ModelCase` builds its model with a dropout probability (0.0 for numeric comparisons against
eager; > 0 to check that train-mode dropout still fuses) and its inputs, including padding
that leaves some query rows with every key masked (HF fills them with finfo.min).

PyPI's torchvision wheel is a CUDA build: beside a CPU torch its C extension does not load,
and `import torchvision` (which transformers and timm import) then fails registering fake
kernels for `torchvision::nms`/`qnms`, ops that were never defined. `_torchvision_shim`
defines those two schemas so the pure-Python parts import; no torchvision op is ever run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

B, L, VOCAB = 2, 8, 96
_shim_lib = None


def _torchvision_shim() -> None:
    global _shim_lib
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    if _shim_lib is None:
        _shim_lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _shim_lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def require(package: str):
    """Import transformers or timm, or skip the calling test (pytest.importorskip)."""
    import pytest

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install flashfuse[models])")
    _torchvision_shim()
    return pytest.importorskip(package, exc_type=ImportError)


def try_import(package: str):
    """For scripts: the module, or None when it is missing or fails to import."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        _torchvision_shim()
        return importlib.import_module(package)
    except Exception:
        return None


@dataclasses.dataclass
class ModelCase:
    name: str
    package: Optional[str]              # transformers, timm or None
    build: Callable[[float], nn.Module]  # dropout probability -> model (random weights)
    inputs: Callable[[], dict]          # keyword arguments of the model's forward
    attention_layers: int               # attention regions one forward runs
    refusal: Optional[str] = None       # the reason the pass refuses this model's attention, if it does
    dropout: bool = True                # does train mode apply dropout to the attention probabilities?
    note: str = ""


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (B, L), generator=_gen())


def _left_padded() -> dict:
    # Sample 1 starts with 3 pad tokens: its first 3 query rows see no unmasked key at all.
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0
    return {"input_ids": _ids(), "attention_mask": mask}


def _right_padded() -> dict:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": _ids(), "attention_mask": mask}


def _hf(config_name: str, model_name: str, **config):
    def build(dropout: float) -> nn.Module:
        T = require("transformers")
        kwargs = {k: (dropout if v == "p" else v) for k, v in config.items()}
        cfg = getattr(T, config_name)(attn_implementation="eager", **kwargs)
        torch.manual_seed(0)
        return getattr(T, model_name)(cfg)

    return build


_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=32, hidden_dropout_prob="p", attention_probs_dropout_prob="p")
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=32, attention_dropout="p")


def _seq2seq_inputs() -> dict:
    return dict(_right_padded(), decoder_input_ids=_ids())


def _pixels(key: str = "pixel_values") -> dict:
    return {key: torch.randn(B, 3, 16, 16, generator=_gen())}


def _timm(model_name: str):
    def build(dropout: float) -> nn.Module:
        timm = require("timm")
        torch.manual_seed(0)
        m = timm.create_model(model_name, pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10, drop_rate=dropout, attn_drop_rate=dropout, proj_drop_rate=dropout)
        for mod in m.modules():  # timm calls F.scaled_dot_product_attention unless told not to
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
        return m

    return build


# ---------------------------------------------------------------------------------------
# the hand-written nanoGPT block (Karpathy's nanoGPT, model.py)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B_, T_, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T_, :T_] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B_, T_, C)
        return self.resid_dropout(self.c_proj(y))


class NanoGPTBlock(nn.Module):
    def __init__(self, n_embd: int = 32, n_head: int = 2, block_size: int = 16, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _nanogpt(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(NanoGPTBlock(dropout=dropout), NanoGPTBlock(dropout=dropout))


# ---------------------------------------------------------------------------------------

CASES = [
    ModelCase("gpt2", "transformers", _hf("GPT2Config", "GPT2Model", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                          attn_pdrop="p", embd_pdrop="p", resid_pdrop="p"), _left_padded, 2),
    ModelCase("bert", "transformers", _hf("BertConfig", "BertModel", **_BERT_LIKE), _right_padded, 2),
    ModelCase("roberta", "transformers", _hf("RobertaConfig", "RobertaModel", pad_token_id=1, **_BERT_LIKE), _right_padded, 2),
    ModelCase("distilbert", "transformers", _hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                hidden_dim=64, max_position_embeddings=32, dropout="p", attention_dropout="p"), _right_padded, 2),
    ModelCase("t5", "transformers", _hf("T5Config", "T5Model", vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                        dropout_rate="p"), _seq2seq_inputs, 6, note="learned relative position bias"),
    ModelCase("bart", "transformers", _hf("BartConfig", "BartModel", vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                          max_position_embeddings=32, dropout="p", attention_dropout="p", activation_dropout="p"),
              _seq2seq_inputs, 6, note="cross-attention"),
    ModelCase("whisper", "transformers", _hf("WhisperConfig", "WhisperModel", vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                             num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=1, bos_token_id=2,
                                             eos_token_id=3, decoder_start_token_id=2, dropout="p", attention_dropout="p", activation_dropout="p"),
              lambda: {"input_features": torch.randn(B, 8, 16, generator=_gen()), "decoder_input_ids": _ids()}, 6,
              note="cross-attention; scale folded into the q projection"),
    ModelCase("trocr", "transformers", _hf("TrOCRConfig", "TrOCRForCausalLM", vocab_size=VOCAB, d_model=32, decoder_layers=2,
                                           decoder_attention_heads=2, decoder_ffn_dim=64, max_position_embeddings=32, dropout="p",
                                           attention_dropout="p", activation_dropout="p"), _left_padded, 2,
              note="BART-era [B*H, M, N] scores viewed as [B, H, M, N] to add the mask"),
    ModelCase("vit", "transformers", _hf("ViTConfig", "ViTModel", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, hidden_dropout_prob="p", attention_probs_dropout_prob="p"),
              _pixels, 2),
    ModelCase("clip_text", "transformers", _hf("CLIPTextConfig", "CLIPTextModel", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=16, attention_dropout="p"),
              _right_padded, 2, note="causal + padding"),
    ModelCase("llama", "transformers", _hf("LlamaConfig", "LlamaModel", num_key_value_heads=2, **_DECODER), _left_padded, 2, note="GQA"),
    ModelCase("llama_no_padding", "transformers", _hf("LlamaConfig", "LlamaModel", num_key_value_heads=2, **_DECODER),
              lambda: {"input_ids": _ids()}, 2, note="GQA; HF's constant causal mask becomes causal=True"),
    ModelCase("mistral", "transformers", _hf("MistralConfig", "MistralModel", num_key_value_heads=1, **_DECODER), _left_padded, 2, note="MQA"),
    ModelCase("qwen2", "transformers", _hf("Qwen2Config", "Qwen2Model", num_key_value_heads=2, **_DECODER), _left_padded, 2, note="GQA"),
    ModelCase("gpt_neox", "transformers", _hf("GPTNeoXConfig", "GPTNeoXModel", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, attention_dropout="p",
                                              hidden_dropout="p"), _left_padded, 2),
    ModelCase("falcon", "transformers", _hf("FalconConfig", "FalconModel", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, attention_dropout="p", hidden_dropout="p"), _left_padded, 2,
              dropout=False, note="scores scaled in place (/=); HF applies no attention dropout on this path"),
    ModelCase("falcon_alibi", "transformers", _hf("FalconConfig", "FalconModel", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, alibi=True, attention_dropout="p", hidden_dropout="p"),
              _left_padded, 2, note="ALiBi bias [B, H, 1, N] and an in-place *= on the scores"),
    ModelCase("gpt_neo", "transformers", _hf("GPTNeoConfig", "GPTNeoModel", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                             attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=32,
                                             attention_dropout="p", embed_dropout="p", resid_dropout="p"), _left_padded, 2,
              refusal="bias_after_finite_fill",
              note="where(causal buffer, s, finfo.min) + padding mask: eager gives finfo.min + mask where both mask, "
                   "which no single fill value reproduces; fully padded rows would differ"),
    ModelCase("timm_vit", "timm", _timm("vit_tiny_patch16_224"), lambda: _pixels("x"), 2, note="scale folded into q"),
    ModelCase("timm_deit", "timm", _timm("deit_tiny_distilled_patch16_224"), lambda: _pixels("x"), 2, note="scale folded into q"),
    ModelCase("nanogpt", None, _nanogpt, lambda: {"input": torch.randn(B, L, 32, generator=_gen(), requires_grad=True)}, 2,
              note="tril buffer mask (a graph input, so kept as a bool mask)"),
]

BY_NAME = {c.name: c for c in CASES}
