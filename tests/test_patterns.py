"""Every attention form the detection pass knows, and every refusal, as graph snapshots.

Each fused form: the Dynamo graph before and after the rewrite (a snapshot), the spec the
pass proved (scale, causal, GQA group, masks, ...), and compiled vs eager numerics (outputs
and grads, reference kernel). Each refusal: the reason, and the graph left as it was.

Snapshots drop the noise of Dynamo's code: the `def forward` line, placeholder aliases
(`l_q_ = L_q_`) and the `;  x = None` frees. Refresh them with

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_patterns.py
"""

from __future__ import annotations

import math
import re

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from flashfuse.explain import explain
from flashfuse.options import parse_options
from flashfuse.passes import fuse_attention
from flashfuse.testing import assert_matches_eager

OPTIONS = {"kernel": "reference", "compiler": "aot_eager"}
B, H, N, D = 2, 2, 8, 16
NEG_INF = float("-inf")
FMIN = torch.finfo(torch.float32).min


def _t(*shape, dtype=torch.float32, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _qkv(*shape, dtype=torch.float32):
    shape = shape or (B, H, N, D)
    return [_t(*shape, dtype=dtype, seed=i) for i in range(3)]


def _pad(b=B, n=N):
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 5:] = False
    return keep


def _code(code: str) -> str:
    lines = []
    for line in code.splitlines()[1:]:
        line = line.strip()
        if re.fullmatch(r"\w+ = L_\w+", line):
            continue
        lines.append(";  ".join(part for part in line.split(";  ") if not re.fullmatch(r"(\w+ = )+None", part)))
    return "\n".join(lines)


def _graphs(report) -> str:
    g = report.graphs[0]
    return f"--- before\n{_code(g.before)}\n--- after\n{_code(g.after)}"


class _Case(expecttest.TestCase):
    def fused(self, fn, *args, numerics=True, **expect):
        """Compile fn: one region fused, none refused, spec as expected, and it matches eager."""
        report = explain(fn, *args, options=OPTIONS)
        self.assertEqual((len(report.fused), len(report.refused)), (1, 0), str(report))
        spec = report.fused[0].spec
        for key, want in expect.items():
            got = getattr(spec, key)
            if isinstance(want, float):
                self.assertAlmostEqual(got, want, places=6, msg=f"{key}: {spec.summary()}")
            else:
                self.assertEqual(got, want, f"{key}: {spec.summary()}")
        if numerics:
            torch._dynamo.reset()
            assert_matches_eager(fn, *args, options=OPTIONS)
        return report

    def refused(self, fn, *args, reason: str) -> str:
        """Compile fn: nothing fused, the reason recorded, the graph unchanged; returns 'reason: detail'."""
        report = explain(fn, *args, options=OPTIONS)
        self.assertEqual(len(report.fused), 0, str(report))
        self.assertEqual([r.reason for r in report.refused], [reason], str(report))
        g = report.graphs[0]
        self.assertEqual(g.after, g.before)
        self.assertEqual(counters["flashfuse"][f"refused_{reason}"], 1)
        torch._dynamo.reset()
        assert_matches_eager(fn, *args, options=OPTIONS, grads=False)
        r = report.refused[0]
        return f"{r.reason}: {r.detail}\n{_code(g.before)}"


def sdpa(s, v):
    return torch.softmax(s, dim=-1) @ v


# ---------------------------------------------------------------------------------------
# Q K^T


class TestQK(_Case):
    def test_matmul_transpose(self):
        def f(q, k, v):
            return F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), dim=-1) @ v

        r = self.fused(f, *_qkv(), scale=0.25, qk_form="matmul", k_form="transpose")
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(-2, -1)
matmul = torch.matmul(l_q_, transpose)
truediv = matmul / 4.0
softmax = torch.nn.functional.softmax(truediv, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_at_mT(self):
        def f(q, k, v):
            return sdpa(q @ k.mT * D**-0.5, v)

        r = self.fused(f, *_qkv(), scale=0.25, k_form="transpose")
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_transpose_2_3_and_permute(self):
        def f(q, k, v):
            return sdpa(q @ k.transpose(2, 3) * 0.25, v)

        self.fused(f, *_qkv(), scale=0.25)

        def g(q, k, v):
            return sdpa(q @ k.permute(0, 1, 3, 2) * 0.25, v)

        r = self.fused(g, *_qkv(), scale=0.25)
        self.assertExpectedInline(_graphs(r), """\
--- before
permute = l_k_.permute(0, 1, 3, 2)
matmul = l_q_ @ permute
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_k_stored_transposed(self):
        q, k, v = _qkv()
        kt = k.detach().transpose(-2, -1).contiguous().requires_grad_()

        def f(q, kt, v):
            return sdpa(q @ kt * 0.25, v)

        r = self.fused(f, q, kt, v, k_form="stored_transposed")
        self.assertExpectedInline(_graphs(r), """\
--- before
matmul = l_q_ @ l_kt_
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
transpose = l_kt_.transpose(-2, -1)
ff_attention = torch.ops.flashfuse.attention.default(l_q_, transpose, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_bmm_3d(self):
        def f(q, k, v):
            return torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v)

        r = self.fused(f, *_qkv(B * H, N, D), layout="3d", qk_form="bmm", pv_form="bmm", q_shape=(1, B * H, N, D))
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(1, 2)
bmm = torch.bmm(l_q_, transpose)
mul = bmm * 0.25
softmax = torch.nn.functional.softmax(mul, dim = -1)
bmm_1 = torch.bmm(softmax, l_v_)
return (bmm_1,)
--- after
unsqueeze = l_q_.unsqueeze(0)
unsqueeze_1 = l_k_.unsqueeze(0)
unsqueeze_2 = l_v_.unsqueeze(0)
ff_attention = torch.ops.flashfuse.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
squeeze = ff_out.squeeze(0)
return (squeeze,)""")

    def test_baddbmm(self):
        bias = _t(B * H, 1, N)

        def f(q, k, v, bias):
            return torch.bmm(F.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.5, alpha=0.25), dim=-1), v)

        r = self.fused(f, *_qkv(B * H, N, D), bias, scale=0.25, qk_form="baddbmm", bias_shapes=((B * H, 1, N),))
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(1, 2)
baddbmm = torch.baddbmm(l_bias_, l_q_, transpose, beta = 0.5, alpha = 0.25)
softmax = torch.nn.functional.softmax(baddbmm, dim = -1)
bmm = torch.bmm(softmax, l_v_)
return (bmm,)
--- after
unsqueeze = l_q_.unsqueeze(0)
unsqueeze_1 = l_k_.unsqueeze(0)
unsqueeze_2 = l_v_.unsqueeze(0)
mul = l_bias_ * 0.5
unsqueeze_3 = mul.unsqueeze(0)
ff_attention = torch.ops.flashfuse.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, unsqueeze_3, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
squeeze = ff_out.squeeze(0)
return (squeeze,)""")

        def g(q, k, v):  # beta=0: baddbmm ignores its input
            empty = torch.empty(q.shape[0], q.shape[1], k.shape[1])
            return torch.bmm(F.softmax(torch.baddbmm(empty, q, k.transpose(1, 2), beta=0.0, alpha=0.25), dim=-1), v)

        self.fused(g, *_qkv(B * H, N, D), scale=0.25, bias_shapes=())

    def test_einsum(self):
        def f(q, k, v):
            s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.25
            return torch.einsum("bhij,bhjd->bhid", s.softmax(dim=-1), v)

        r = self.fused(f, *_qkv(), qk_form="einsum", pv_form="einsum")
        self.assertExpectedInline(_graphs(r), """\
--- before
einsum = torch.functional.einsum('bhid,bhjd->bhij', l_q_, l_k_)
s = einsum * 0.25
softmax = s.softmax(dim = -1)
einsum_1 = torch.functional.einsum('bhij,bhjd->bhid', softmax, l_v_)
return (einsum_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_einsum_equivalent_subscripts(self):
        for qk_eq, pv_eq, swap in [
            ("b h i d, b h j d -> b h i j", "b h i j, b h j d -> b h i d", False),
            ("...qd,...kd->...qk", "...qk,...kd->...qd", False),
            ("bhqd,bhkd->bhqk", "bhkd,bhqk->bhqd", False),  # V first in P V
            ("bhjd,bhid->bhij", "bhij,bhjd->bhid", True),  # K first in Q K^T
            ("xyzw,xyaw->xyza", "xyza,xyaw->xyzw", False),
            ("bhid,bhdj->bhij", "bhij,bhjd->bhid", False),  # K stored transposed
        ]:
            with self.subTest(qk=qk_eq, pv=pv_eq):
                q, k, v = _qkv()
                if "dj" in qk_eq:
                    k = k.detach().transpose(-2, -1).contiguous().requires_grad_()

                def f(q, k, v):
                    s = torch.einsum(qk_eq, k, q) if swap else torch.einsum(qk_eq, q, k)
                    p = (s * 0.25).softmax(-1)
                    return torch.einsum(pv_eq, v, p) if pv_eq.startswith("bhkd") else torch.einsum(pv_eq, p, v)

                torch._dynamo.reset()
                self.fused(f, q, k, v, scale=0.25)

    def test_einsum_other_layout(self):
        # q, k, v as [B, N, H, D]: the op reads them through permuted views, and permutes the output back.
        def f(q, k, v):
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

        r = self.fused(f, *_qkv(B, N, H, D), q_shape=(B, H, N, D))
        self.assertExpectedInline(_graphs(r), """\
--- before
einsum = torch.functional.einsum('bqhd,bkhd->bhqk', l_q_, l_k_)
s = einsum * 0.25
softmax = s.softmax(-1)
einsum_1 = torch.functional.einsum('bhqk,bkhd->bqhd', softmax, l_v_)
return (einsum_1,)
--- after
permute = l_q_.permute(0, 2, 1, 3)
permute_1 = l_k_.permute(0, 2, 1, 3)
permute_2 = l_v_.permute(0, 2, 1, 3)
ff_attention = torch.ops.flashfuse.attention.default(permute, permute_1, permute_2, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
permute_3 = ff_out.permute(0, 2, 1, 3)
return (permute_3,)""")

    def test_head_views_bart_era(self):
        # TrOCR, FSMT, LED, XGLM: [B*H, M, N] scores viewed as [B, H, M, N] to add the mask, and back;
        # the op reads the 3-D q, k, v as [B, H, L, D] and its output is viewed back as [B*H, M, D]
        mask = torch.zeros(B, 1, N, N).masked_fill(~_pad()[:, None, None, :], FMIN)

        def f(q, k, v, mask):
            w = torch.bmm(q, k.transpose(1, 2))
            w = w.view(B, H, N, N) + mask
            w = w.view(B * H, N, N)
            p = F.softmax(w, dim=-1)
            p = p.view(B, H, N, N).view(B * H, N, N)  # XGLM keeps a 4-D view for output_attentions
            return torch.bmm(F.dropout(p, p=0.1, training=False), v)

        r = self.fused(f, *_qkv(B * H, N, D), mask, layout="3d", q_shape=(B, H, N, D), bias_shapes=((B, 1, N, N),))
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(1, 2)
w = torch.bmm(l_q_, transpose)
view = w.view(2, 2, 8, 8)
w_1 = view + l_mask_
w_2 = w_1.view(4, 8, 8)
p = torch.nn.functional.softmax(w_2, dim = -1)
view_2 = p.view(2, 2, 8, 8)
p_1 = view_2.view(4, 8, 8)
dropout = torch.nn.functional.dropout(p_1, p = 0.1, training = False)
bmm_1 = torch.bmm(dropout, l_v_)
return (bmm_1,)
--- after
reshape = l_q_.reshape(2, 2, 8, 16)
reshape_1 = l_k_.reshape(2, 2, 8, 16)
reshape_2 = l_v_.reshape(2, 2, 8, 16)
ff_attention = torch.ops.flashfuse.attention.default(reshape, reshape_1, reshape_2, l_mask_, None, 1.0, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
reshape_3 = ff_out.reshape(4, 8, 16)
return (reshape_3,)""")

    def test_qkv_from_split_chunk_unbind(self):
        x = _t(B, N, 3 * H * D)

        def split(x):
            q, k, v = x.split(H * D, dim=2)
            q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
            return (sdpa(q @ k.transpose(-2, -1) * 0.25, v)).transpose(1, 2).reshape(B, N, H * D)

        def chunk(x):
            q, k, v = x.chunk(3, dim=-1)
            q, k, v = (t.reshape(B, N, H, D).permute(0, 2, 1, 3) for t in (q, k, v))
            return (sdpa(q @ k.transpose(-2, -1) * 0.25, v)).permute(0, 2, 1, 3).flatten(2)

        def unbind(x):  # timm: the scale is folded into q
            q, k, v = x.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            q = q * D**-0.5
            return (sdpa(q @ k.transpose(-2, -1), v)).transpose(1, 2).reshape(B, N, H * D)

        for fn in (split, chunk, unbind):
            with self.subTest(fn.__name__):
                torch._dynamo.reset()
                r = self.fused(fn, x, scale=0.25)
        self.assertExpectedInline(_graphs(r), """\
--- before
reshape = l_x_.reshape(2, 8, 3, 2, 16)
permute = reshape.permute(2, 0, 3, 1, 4)
unbind = permute.unbind(0)
q = unbind[0]
k = unbind[1]
v = unbind[2]
q_1 = q * 0.25
transpose = k.transpose(-2, -1)
matmul = q_1 @ transpose
softmax = torch.softmax(matmul, dim = -1)
matmul_1 = softmax @ v
transpose_1 = matmul_1.transpose(1, 2)
reshape_1 = transpose_1.reshape(2, 8, 32)
return (reshape_1,)
--- after
reshape = l_x_.reshape(2, 8, 3, 2, 16)
permute = reshape.permute(2, 0, 3, 1, 4)
unbind = permute.unbind(0)
q = unbind[0]
k = unbind[1]
v = unbind[2]
ff_attention = torch.ops.flashfuse.attention.default(q, k, v, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
transpose_1 = ff_out.transpose(1, 2)
reshape_1 = transpose_1.reshape(2, 8, 32)
return (reshape_1,)""")


# ---------------------------------------------------------------------------------------
# the scale


class TestScale(_Case):
    def test_scale_spellings(self):
        d = D
        forms = {
            "div_number": lambda q, k: q @ k.mT / 4,
            "mul_number": lambda q, k: 0.25 * (q @ k.mT),
            "div_sqrt": lambda q, k: q @ k.mT / math.sqrt(d),
            "mul_pow": lambda q, k: q @ k.mT * d**-0.5,
            "div_pow": lambda q, k: q @ k.mT / d**0.5,
            "torch_mul": lambda q, k: torch.mul(q @ k.mT, 0.25),
            "div_tensor_0d": lambda q, k: q @ k.mT / torch.tensor(4.0),
            "mul_tensor_0d": lambda q, k: q @ k.mT * torch.tensor(d) ** -0.5,
            "folded_into_q": lambda q, k: (q * 0.25) @ k.mT,
            "split_q_k": lambda q, k: (q * 0.5) @ (k * 0.5).mT,
            "q_divided": lambda q, k: (q / 2.0) @ (k / 2.0).transpose(-2, -1),
            "twice": lambda q, k: q @ k.mT * 0.5 * 0.5,
        }
        for name, scores in forms.items():
            with self.subTest(name):
                torch._dynamo.reset()
                self.fused(lambda q, k, v: sdpa(scores(q, k), v), *_qkv(), scale=0.25)

    def test_no_scale(self):
        self.fused(lambda q, k, v: sdpa(q @ k.mT, v), *_qkv(), scale=1.0)

    def test_scale_folded_into_q(self):
        def f(q, k, v):
            q = q * 0.25
            return sdpa(q @ k.transpose(-2, -1), v)

        r = self.fused(f, *_qkv(), scale=0.25)
        self.assertExpectedInline(_graphs(r), """\
--- before
q = l_q_ * 0.25
transpose = l_k_.transpose(-2, -1)
matmul = q @ transpose
softmax = torch.softmax(matmul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_scale_in_place(self):
        def f(q, k, v):  # Falcon: attention_scores /= math.sqrt(head_dim)
            s = q @ k.transpose(-1, -2)
            s /= math.sqrt(D)
            return sdpa(s, v)

        r = self.fused(f, *_qkv(), scale=0.25)
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(-1, -2)
s = l_q_ @ transpose
s /= 4.0;  s_1 = s
softmax = torch.softmax(s_1, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")


# ---------------------------------------------------------------------------------------
# masks and biases


class TestMasks(_Case):
    def test_additive_masks_any_broadcast(self):
        shapes = {"b11n": (B, 1, 1, N), "b1mn": (B, 1, N, N), "11mn": (1, 1, N, N), "mn": (N, N), "bhmn": (B, H, N, N), "1hmn": (1, H, N, N)}
        for name, shape in shapes.items():
            with self.subTest(name):
                torch._dynamo.reset()
                mask = torch.zeros(shape).masked_fill(torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3, NEG_INF)
                mask[..., 0] = 0.0  # keep a key in every row
                self.fused(lambda q, k, v, m: sdpa(q @ k.mT * 0.25 + m, v), *_qkv(), mask, bias_shapes=(shape,))

    def test_padding_mask_additive_finfo_min(self):
        # HF: (1 - mask) * finfo.min, [B, 1, 1, N]; sample 0 has every key masked (a fully padded row)
        keep = _pad()
        keep[0] = False
        ext = (1.0 - keep[:, None, None, :].float()) * FMIN

        def f(q, k, v, ext):
            return F.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + ext, dim=-1) @ v

        r = self.fused(f, *_qkv(), ext, bias_shapes=((B, 1, 1, N),))
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(-1, -2)
matmul = l_q_ @ transpose
truediv = matmul / 4.0
add = truediv + l_ext_
softmax = torch.nn.functional.softmax(add, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, l_ext_, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_bool_mask_masked_fill(self):
        def f(q, k, v, keep):
            s = (q @ k.mT * 0.25).masked_fill(~keep[:, None, None, :], NEG_INF)
            return sdpa(s, v)

        r = self.fused(f, *_qkv(), _pad(), mask_shapes=((B, 1, 1, N),), mask_value=NEG_INF)
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
getitem = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
invert = ~getitem
s = mul.masked_fill(invert, -inf)
softmax = torch.softmax(s, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
getitem = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, getitem, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_01_float_mask_eq_0(self):
        def f(q, k, v, mask):  # mask: 1.0 keep, 0.0 pad; filled with finfo.min
            s = (q @ k.mT * 0.25).masked_fill(mask[:, None, None, :] == 0, torch.finfo(q.dtype).min)
            return sdpa(s, v)

        r = self.fused(f, *_qkv(), _pad().float(), mask_value=FMIN)
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
getitem = l_mask_[(slice(None, None, None), None, None, slice(None, None, None))]
eq = getitem == 0
s = mul.masked_fill(eq, -3.4028234663852886e+38)
softmax = torch.softmax(s, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
getitem = l_mask_[(slice(None, None, None), None, None, slice(None, None, None))]
eq = getitem == 0
logical_not = torch.logical_not(eq)
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, logical_not, 0.25, False, 0.0, None, 1, -3.4028234663852886e+38, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_where_forms(self):
        forms = {
            "where_keep_large_neg": lambda s, keep: torch.where(keep, s, -1e9),
            "where_drop_tensor_fill": lambda s, keep: torch.where(~keep, torch.tensor(-1e4), s),
            "tensor_where": lambda s, keep: s.where(keep, NEG_INF),
            "masked_fill_in_place": lambda s, keep: s.masked_fill_(~keep, NEG_INF),
            "where_01_bool": lambda s, keep: torch.where(keep.float().bool(), s, FMIN),
        }
        for name, masked in forms.items():
            with self.subTest(name):
                torch._dynamo.reset()
                self.fused(lambda q, k, v, keep: sdpa(masked(q @ k.mT * 0.25, keep[:, None, None, :]), v), *_qkv(), _pad(), mask_shapes=((B, 1, 1, N),))

    def test_in_place_masked_fill_result_dropped(self):
        def f(q, k, v, keep):
            s = q @ k.mT
            s.div_(4.0)
            s.masked_fill_(~keep[:, None, None, :], NEG_INF)
            return sdpa(s, v)

        r = self.fused(f, *_qkv(), _pad(), scale=0.25)
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
s = l_q_ @ getattr_1
div_ = s.div_(4.0)
getitem = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
invert = ~getitem
masked_fill_ = s.masked_fill_(invert, -inf)
softmax = torch.softmax(s, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
getitem = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, getitem, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_causal_tril_buffer_is_a_mask(self):
        # A buffer is a graph input (it may change between calls): kept as a bool mask, not causal=True.
        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

            def forward(self, q, k, v):
                s = q @ k.transpose(-2, -1) * 0.25
                s = s.masked_fill(self.bias[:, :, :N, :N] == 0, NEG_INF)
                return sdpa(s, v)

        r = self.fused(Attn(), *_qkv(), causal=False, mask_shapes=((1, 1, N, N),))
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(-2, -1)
matmul = l_q_ @ transpose
s = matmul * 0.25
getitem = l_self_buffers_bias_[(slice(None, None, None), slice(None, None, None), slice(None, 8, None), slice(None, 8, None))]
eq = getitem == 0
s_1 = s.masked_fill(eq, -inf)
softmax = torch.softmax(s_1, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
getitem = l_self_buffers_bias_[(slice(None, None, None), slice(None, None, None), slice(None, 8, None), slice(None, 8, None))]
eq = getitem == 0
logical_not = torch.logical_not(eq)
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, logical_not, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_causal_proven_in_graph(self):
        forms = {
            "ones_tril": lambda s: s.masked_fill(torch.ones(N, N, dtype=torch.bool).tril().logical_not(), NEG_INF),
            "triu_1": lambda s: s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1), NEG_INF),
            "arange_where": lambda s: torch.where(torch.arange(N)[:, None] >= torch.arange(N)[None, :], s, NEG_INF),
            "additive_triu_inf": lambda s: s + torch.full((N, N), NEG_INF).triu(1),
            "finfo_min_fill": lambda s: s.masked_fill(torch.arange(N)[None, :] > torch.arange(N)[:, None], torch.finfo(s.dtype).min),
            "hf_additive_finfo_min": lambda s: s + torch.where(torch.arange(N)[None, None, None, :] <= torch.arange(N)[None, None, :, None],
                                                              torch.zeros(()), FMIN).expand(B, 1, N, N),
        }
        for name, causal in forms.items():
            with self.subTest(name):
                torch._dynamo.reset()
                self.fused(lambda q, k, v: sdpa(causal(q @ k.mT * 0.25), v), *_qkv(), causal=True, mask_shapes=(), bias_shapes=())

    def test_hf_causal_mask(self):
        # transformers' eager mask without padding: where(kv <= q, 0, finfo.min), expanded over the batch
        def f(q, k, v):
            q_idx, kv_idx = torch.arange(N)[None, None, :, None], torch.arange(N)[None, None, None, :]
            mask = torch.where((kv_idx <= q_idx).expand(B, -1, N, N), torch.zeros(()), FMIN)
            s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
            return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)

        r = self.fused(f, *_qkv(), causal=True)
        self.assertExpectedInline(_graphs(r), """\
--- before
arange = torch.arange(8)
q_idx = arange[(None, None, slice(None, None, None), None)]
arange_1 = torch.arange(8)
kv_idx = arange_1[(None, None, None, slice(None, None, None))]
le = kv_idx <= q_idx
expand = le.expand(2, -1, 8, 8)
zeros = torch.zeros(())
mask = torch.where(expand, zeros, -3.4028234663852886e+38)
transpose = l_k_.transpose(2, 3)
matmul = torch.matmul(l_q_, transpose)
mul = matmul * 0.25
s = mul + mask
softmax = torch.nn.functional.softmax(s, dim = -1, dtype = torch.float32)
to = softmax.to(torch.float32)
matmul_1 = torch.matmul(to, l_v_)
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, True, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_finite_causal_with_padding_stays_a_mask(self):
        # finfo.min causal + a padding mask: a padded row sees only finfo.min scores, and eager
        # spreads it over all keys; causal=True would give -inf there. Kept as masks, exactly.
        def f(q, k, v, keep):
            s = (q @ k.mT * 0.25).masked_fill(~keep[:, None, None, :], FMIN)
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), FMIN)
            return sdpa(s, v)

        keep = _pad()
        keep[0] = False
        self.fused(f, *_qkv(), keep, causal=False, mask_shapes=((B, 1, 1, N), (N, N)), mask_value=FMIN)

    def test_position_biases_with_grad(self):
        rel = nn.Embedding(2 * N - 1, H)  # T5 / relative position table

        def t5(q, k, v):
            pos = torch.arange(N)
            bias = rel(pos[None, :] - pos[:, None] + N - 1).permute(2, 0, 1).unsqueeze(0)  # [1, H, N, N]
            return sdpa(q @ k.mT + bias, v)

        r = self.fused(t5, *_qkv(), scale=1.0, bias_shapes=((1, H, N, N),), bias_requires_grad=True)
        self.assertExpectedInline(_graphs(r), """\
--- before
pos = torch.arange(8)
getitem = pos[(None, slice(None, None, None))]
getitem_1 = pos[(slice(None, None, None), None)]
sub = getitem - getitem_1
add = sub + 8
sub_1 = add - 1
embedding = torch.nn.functional.embedding(sub_1, l_rel_parameters_weight_, None, None, 2.0, False, False)
permute = embedding.permute(2, 0, 1)
bias = permute.unsqueeze(0)
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
add_1 = matmul + bias
softmax = torch.softmax(add_1, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
pos = torch.arange(8)
getitem = pos[(None, slice(None, None, None))]
getitem_1 = pos[(slice(None, None, None), None)]
sub = getitem - getitem_1
add = sub + 8
sub_1 = add - 1
embedding = torch.nn.functional.embedding(sub_1, l_rel_parameters_weight_, None, None, 2.0, False, False)
permute = embedding.permute(2, 0, 1)
bias = permute.unsqueeze(0)
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, bias, None, 1.0, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

        table = nn.Parameter(torch.randn((2 * N - 1), H))  # Swin-style table gathered by an index
        index = (torch.arange(N)[:, None] - torch.arange(N)[None, :] + N - 1).reshape(-1)

        def swin(q, k, v):
            bias = table[index].view(N, N, H).permute(2, 0, 1).contiguous()  # [H, N, N]
            return sdpa(q * 0.25 @ k.mT + bias.unsqueeze(0), v)

        torch._dynamo.reset()
        self.fused(swin, *_qkv(), scale=0.25, bias_requires_grad=True)

    def test_alibi_then_padding_then_causal(self):
        slopes = torch.tensor([2.0**-1, 2.0**-2]).view(1, H, 1, 1)

        def f(q, k, v, keep):
            pos = torch.arange(N)
            s = q @ k.transpose(-2, -1) * 0.25
            s = s + slopes * (pos[None, :] - pos[:, None]).float()  # ALiBi: [1, H, N, N], constant
            s = s.masked_fill(~keep[:, None, None, :], NEG_INF)
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), NEG_INF)
            return sdpa(s, v)

        r = self.fused(f, *_qkv(), _pad(), causal=True, bias_shapes=((1, H, N, N),), mask_shapes=((B, 1, 1, N),))
        self.assertExpectedInline(_graphs(r), """\
--- before
pos = torch.arange(8)
transpose = l_k_.transpose(-2, -1)
matmul = l_q_ @ transpose
s = matmul * 0.25
getitem = pos[(None, slice(None, None, None))]
getitem_1 = pos[(slice(None, None, None), None)]
sub = getitem - getitem_1
float_1 = sub.float()
mul_1 = l_slopes_ * float_1
s_1 = s + mul_1
getitem_2 = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
invert = ~getitem_2
s_2 = s_1.masked_fill(invert, -inf)
ones = torch.ones(8, 8, dtype = torch.bool)
triu = ones.triu(1)
s_3 = s_2.masked_fill(triu, -inf)
softmax = torch.softmax(s_3, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)
--- after
pos = torch.arange(8)
getitem = pos[(None, slice(None, None, None))]
getitem_1 = pos[(slice(None, None, None), None)]
sub = getitem - getitem_1
float_1 = sub.float()
mul_1 = l_slopes_ * float_1
getitem_2 = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, mul_1, getitem_2, 0.25, True, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_constant_zero_bias_is_dropped(self):
        def f(q, k, v):  # T5 cross-attention: position_bias = torch.zeros(1, H, M, N)
            return sdpa(q @ k.mT + torch.zeros(1, H, N, N), v)

        self.fused(f, *_qkv(), bias_shapes=())


# ---------------------------------------------------------------------------------------
# softmax and dropout


class TestSoftmaxDropout(_Case):
    def test_softmax_spellings(self):
        softmax = nn.Softmax(dim=-1)
        forms = {
            "F.softmax": lambda s: F.softmax(s, dim=-1),
            "torch.softmax": lambda s: torch.softmax(s, -1),
            "Tensor.softmax": lambda s: s.softmax(dim=-1),
            "nn.Softmax": softmax,
            "positive_dim": lambda s: F.softmax(s, dim=3),
            "dtype_kwarg": lambda s: F.softmax(s, dim=-1, dtype=torch.float32),
            "float_type_as": lambda s: F.softmax(s.float(), dim=-1).type_as(s),
            "to_fp32_to": lambda s: F.softmax(s.to(torch.float32), dim=-1).to(s.dtype),
            "type": lambda s: s.float().softmax(-1).type(torch.float32),
        }
        for name, sm in forms.items():
            with self.subTest(name):
                torch._dynamo.reset()
                self.fused(lambda q, k, v: sm(q @ k.mT * 0.25) @ v, *_qkv(), softmax_dtype="float32")

    def test_bf16_upcast_softmax(self):
        def f(q, k, v):
            s = (q @ k.transpose(-2, -1) * 0.25).float()
            return F.softmax(s, dim=-1).to(q.dtype) @ v

        r = self.fused(f, *_qkv(dtype=torch.bfloat16), dtype="bfloat16", softmax_dtype="float32")
        self.assertExpectedInline(_graphs(r), """\
--- before
transpose = l_k_.transpose(-2, -1)
matmul = l_q_ @ transpose
mul = matmul * 0.25
s = mul.float()
softmax = torch.nn.functional.softmax(s, dim = -1)
to = softmax.to(torch.bfloat16)
matmul_1 = to @ l_v_
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_dropout_removed(self):
        drop = nn.Dropout(0.1).eval()
        forms = {
            "F.dropout_eval": lambda p: F.dropout(p, 0.1, training=False),
            "nn.Dropout_eval": drop,
            "torch.dropout_p0": lambda p: torch.dropout(p, 0.0, True),
            "F.dropout_p0": lambda p: F.dropout(p, p=0.0),
        }
        for name, dropout in forms.items():
            with self.subTest(name):
                torch._dynamo.reset()
                self.fused(lambda q, k, v: dropout(F.softmax(q @ k.mT * 0.25, -1)) @ v, *_qkv(), dropout_p=0.0)

    def test_dropout_fused(self):
        drop = nn.Dropout(0.1).train()

        def f(q, k, v):
            return drop(F.softmax(q @ k.mT * 0.25, -1)) @ v

        r = self.fused(f, *_qkv(), dropout_p=0.1, numerics=False)
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.nn.functional.softmax(mul, -1)
dropout = torch.nn.functional.dropout(softmax, 0.1, True, False)
matmul_1 = dropout @ l_v_
return (matmul_1,)
--- after
ff_seed = torch.randint(0, 4611686018427387904, (1,), dtype = torch.int64, device = device(type='cpu'))
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.1, ff_seed, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")
        torch._dynamo.reset()
        self.fused(lambda q, k, v: torch.dropout(F.softmax(q @ k.mT * 0.25, -1), 0.2, True) @ v, *_qkv(), dropout_p=0.2, numerics=False)


# ---------------------------------------------------------------------------------------
# P V, output layout, GQA


class TestPVAndGQA(_Case):
    def test_output_merged_heads(self):
        def f(q, k, v):
            y = torch.matmul(F.softmax(q @ k.mT * 0.25, -1), v)
            return y.transpose(1, 2).contiguous().view(B, N, H * D)

        r = self.fused(f, *_qkv())
        self.assertExpectedInline(_graphs(r), """\
--- before
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.nn.functional.softmax(mul, -1)
y = torch.matmul(softmax, l_v_)
transpose = y.transpose(1, 2)
contiguous = transpose.contiguous()
view = contiguous.view(2, 8, 32)
return (view,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference')
ff_out = ff_attention[0]
transpose = ff_out.transpose(1, 2)
contiguous = transpose.contiguous()
view = contiguous.view(2, 8, 32)
return (view,)""")

    def test_gqa_repeat_kv(self):
        def repeat_kv(x, n):  # transformers' repeat_kv
            b, h, s, d = x.shape
            return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

        def f(q, k, v):
            return sdpa(torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * 0.25, repeat_kv(v, 2))

        q, (k, v) = _t(B, 4, N, D), _qkv(B, 2, N, D)[:2]
        r = self.fused(f, q, k, v, gqa_group=2, k_shape=(B, 2, N, D))
        self.assertExpectedInline(_graphs(r), """\
--- before
getitem = l_k_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
expand = getitem.expand(2, 2, 2, 8, 16)
reshape = expand.reshape(2, 4, 8, 16)
transpose = reshape.transpose(2, 3)
matmul = torch.matmul(l_q_, transpose)
mul = matmul * 0.25
getitem_1 = l_v_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
expand_1 = getitem_1.expand(2, 2, 2, 8, 16)
reshape_1 = expand_1.reshape(2, 4, 8, 16)
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ reshape_1
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 2, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

    def test_gqa_repeat_interleave_and_mqa(self):
        def f(q, k, v):
            return sdpa(q @ k.repeat_interleave(4, dim=1).transpose(-2, -1) * 0.25, v.repeat_interleave(4, dim=1))

        q, (k, v) = _t(B, 4, N, D), _qkv(B, 1, N, D)[:2]
        r = self.fused(f, q, k, v, gqa_group=4, k_shape=(B, 1, N, D))
        self.assertExpectedInline(_graphs(r), """\
--- before
repeat_interleave = l_k_.repeat_interleave(4, dim = 1)
transpose = repeat_interleave.transpose(-2, -1)
matmul = l_q_ @ transpose
mul = matmul * 0.25
repeat_interleave_1 = l_v_.repeat_interleave(4, dim = 1)
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ repeat_interleave_1
return (matmul_1,)
--- after
ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 4, -inf, True, 'reference')
ff_out = ff_attention[0]
return (ff_out,)""")

        def mqa(q, k, v):  # K/V with one head, broadcast by the matmul
            return sdpa(q @ k.transpose(-2, -1) * 0.25, v)

        torch._dynamo.reset()
        self.fused(mqa, q, k, v, gqa_group=4)


# ---------------------------------------------------------------------------------------
# refusals: the reason is recorded and the graph kept as it was


def _capture(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args)
    return graphs[0]


class TestRefusals(_Case):
    def test_softmax_over_queries(self):
        out = self.refused(lambda q, k, v: F.softmax(q @ k.mT * 0.25, dim=-2) @ v, *_qkv(), reason="softmax_dim")
        self.assertExpectedInline(out, """\
softmax_dim: softmax over dim -2 of a 4-D tensor, not the key dim
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.nn.functional.softmax(mul, dim = -2)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_k_permuted(self):
        # pytorch#195320: a K permuted other than a swap of its last two dims is not K^T
        def f(q, k, v):
            return sdpa(q @ k.permute(0, 2, 3, 1) * 0.25, v)

        out = self.refused(f, _t(B, H, N, D), _t(B, N, H, D), _t(B, H, N, D), reason="k_permuted")
        self.assertExpectedInline(out, """\
k_permuted: K is permuted by [0, 2, 3, 1], which is not a transpose of the last two dims
permute = l_k_.permute(0, 2, 3, 1)
matmul = l_q_ @ permute
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_probs_returned(self):
        def f(q, k, v):  # output_attentions=True
            p = F.softmax(q @ k.mT * 0.25, dim=-1)
            return p @ v, p

        out = self.refused(f, *_qkv(), reason="probs_reused")
        self.assertExpectedInline(out, """\
probs_reused: attention probabilities p are also used outside the region (e.g. returned attention weights)
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
p = torch.nn.functional.softmax(mul, dim = -1)
matmul_1 = p @ l_v_
return (matmul_1, p)""")

    def test_scores_returned(self):
        def f(q, k, v):
            s = q @ k.mT * 0.25
            return sdpa(s, v), s

        out = self.refused(f, *_qkv(), reason="scores_reused")
        self.assertExpectedInline(out, """\
scores_reused: scores s are also used outside the attention region
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
s = matmul * 0.25
softmax = torch.softmax(s, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1, s)""")

    def test_mask_grows_the_scores(self):
        # q has batch 1; the bias's batch 2 would broadcast every score: the op cannot express it
        out = self.refused(lambda q, k, v, m: sdpa(q @ k.mT * 0.25 + m, v), _t(1, H, N, D), _t(1, H, N, D), _t(1, H, N, D),
                           _t(B, 1, N, N), reason="mask_broadcast")
        self.assertExpectedInline(out, """\
mask_broadcast: mul changes the scores' shape [1, 2, 8, 8] vs [2, 2, 8, 8]
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
add = mul + l_m_
softmax = torch.softmax(add, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_scale_not_constant(self):
        out = self.refused(lambda q, k, v, t: sdpa(q @ k.mT * t, v), *_qkv(), torch.tensor(0.25), reason="scale_not_constant")
        self.assertExpectedInline(out, """\
scale_not_constant: scale l_t_ is not a compile-time constant
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * l_t_
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_bias_after_finite_fill(self):
        # GPT-Neo: where(causal, s, finfo.min) + mask: eager gives finfo.min + mask where both mask
        def f(q, k, v, keep, m):
            s = torch.where(keep, q @ k.mT, torch.tensor(FMIN))
            return sdpa(s + m, v)

        out = self.refused(f, *_qkv(), _pad()[:, None, None, :], _t(B, 1, 1, N, grad=False), reason="bias_after_finite_fill")
        self.assertExpectedInline(out, """\
bias_after_finite_fill: an additive term follows a mask filled with a finite value; the fused op adds biases before masking
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
tensor = torch.tensor(-3.4028234663852886e+38)
s = torch.where(l_keep_, matmul, tensor)
add = s + l_m_
softmax = torch.softmax(add, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_fill_values_differ(self):
        def f(q, k, v, pad, drop):
            return sdpa((q @ k.mT).masked_fill(pad, -1e4).masked_fill(drop, -1e9), v)

        drop = torch.rand(N, N, generator=torch.Generator().manual_seed(0)) < 0.2
        out = self.refused(f, *_qkv(), ~_pad()[:, None, None, :], drop, reason="fill_values_differ")
        self.assertExpectedInline(out, """\
fill_values_differ: two masks use different fill values
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
masked_fill = matmul.masked_fill(l_pad_, -10000.0)
masked_fill_1 = masked_fill.masked_fill(l_drop_, -1000000000.0)
softmax = torch.softmax(masked_fill_1, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_finite_fill_after_causal(self):
        def f(q, k, v, keep):
            s = (q @ k.mT).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), NEG_INF)
            return sdpa(s.masked_fill(~keep[:, None, None, :], -1e9), v)

        out = self.refused(f, *_qkv(), _pad(), reason="finite_fill_after_causal")
        self.assertExpectedInline(out, """\
finite_fill_after_causal: a finite-fill mask follows the causal mask; eager would overwrite -inf where both mask
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
ones = torch.ones(8, 8, dtype = torch.bool)
triu = ones.triu(1)
s = matmul.masked_fill(triu, -inf)
getitem = l_keep_[(slice(None, None, None), None, None, slice(None, None, None))]
invert = ~getitem
masked_fill_1 = s.masked_fill(invert, -1000000000.0)
softmax = torch.softmax(masked_fill_1, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_head_dim_too_large(self):
        out = self.refused(lambda q, k, v: sdpa(q @ k.mT * 0.25, v), *_qkv(1, 1, 4, 512), reason="unsupported_head_dim")
        self.assertExpectedInline(out, """\
unsupported_head_dim: head dim 512 is outside 1..256
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def test_float64(self):
        out = self.refused(lambda q, k, v: sdpa(q @ k.mT * 0.25, v), *_qkv(dtype=torch.float64), reason="unsupported_dtype")
        self.assertExpectedInline(out, """\
unsupported_dtype: dtype torch.float64 is not fp16, bf16 or fp32
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")

    def _refused_graph(self, gm, reason: str) -> str:
        report = fuse_attention(gm, parse_options({"kernel": "reference", "compiler": "eager"}))
        self.assertEqual((len(report.fused), [r.reason for r in report.refused]), (0, [reason]), str(report))
        self.assertEqual(report.after, report.before)
        return f"{report.refused[0].reason}: {report.refused[0].detail}\n{_code(report.before)}"

    def test_dropout_p_not_constant(self):
        # Dynamo bakes Python floats in; give the dropout a p computed at run time instead.
        gm = _capture(lambda q, k, v: F.dropout(F.softmax(q @ k.mT * 0.25, -1), 0.1) @ v, *_qkv())
        drop = next(n for n in gm.graph.nodes if n.target is F.dropout)
        with gm.graph.inserting_before(drop):
            p = gm.graph.call_function(torch.rand, ((),))
            p_float = gm.graph.call_method("item", (p,))
        drop.args = (drop.args[0], p_float) + tuple(drop.args[2:])
        gm.recompile()
        self.assertExpectedInline(self._refused_graph(gm, "dropout_not_constant"), """\
dropout_not_constant: dropout dropout has p=None training=True, not constants
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.nn.functional.softmax(mul, -1)
rand = torch.rand(())
item = rand.item()
dropout = torch.nn.functional.dropout(softmax, item)
matmul_1 = dropout @ l_v_
return (matmul_1,)""")

    def test_missing_meta(self):
        gm = _capture(lambda q, k, v: sdpa(q @ k.mT * 0.25, v), *_qkv())
        mul = next(n for n in gm.graph.nodes if n.name == "mul")
        del mul.meta["example_value"]
        self.assertExpectedInline(self._refused_graph(gm, "missing_meta"), """\
missing_meta: node mul has no Dynamo example value
getattr_1 = l_k_.mT
matmul = l_q_ @ getattr_1
mul = matmul * 0.25
softmax = torch.softmax(mul, dim = -1)
matmul_1 = softmax @ l_v_
return (matmul_1,)""")
