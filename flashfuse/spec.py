"""AttentionSpec: everything lowering needs to know about one fused attention region."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The semantics of one region, as detection proved them (see kernels/reference.py).

    Shapes are the op's 4-D views ([B, Hq, M, D] for q); `layout` says how the user's code
    held them ("4d", or "3d" for [B*H, L, D] tensors that the rewrite views as [1, B*H, L, D]).
    """

    scale: float
    causal: bool
    dropout_p: float
    gqa_group: int
    softmax_dtype: str          # dtype the user's softmax ran in, e.g. "float32"
    dtype: str                  # dtype of q, k, v and the output
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    layout: str = "4d"
    k_form: str = "transpose"   # how K^T reached the matmul: "transpose" or "stored_transposed"
    bias_shapes: tuple = ()     # shapes of the additive terms as the user wrote them
    bias_requires_grad: bool = False
    mask_shapes: tuple = ()     # shapes of the bool masks (True = keep after rewrite)
    mask_value: float = float("-inf")
    qk_form: str = "matmul"     # matmul, bmm, einsum, baddbmm
    pv_form: str = "matmul"

    @property
    def head_dim(self) -> int:
        return int(self.q_shape[-1])

    @property
    def mask_kind(self) -> str:
        kinds = [name for name, on in (("causal", self.causal), ("bool", bool(self.mask_shapes)), ("additive", bool(self.bias_shapes))) if on]
        return "+".join(kinds) or "none"

    def summary(self) -> str:
        drop = f"dropout={self.dropout_p:g}" if self.dropout_p else "dropout=none"
        bias = f" bias={list(map(list, self.bias_shapes))}" if self.bias_shapes else ""
        mask = f" mask={list(map(list, self.mask_shapes))} fill={self.mask_value:g}" if self.mask_shapes else ""
        return (
            f"scale={self.scale:.6g} mask={self.mask_kind}{bias}{mask} causal={self.causal} {drop} "
            f"gqa_group={self.gqa_group} softmax_dtype={self.softmax_dtype} dtype={self.dtype} "
            f"q={list(self.q_shape)} k={list(self.k_shape)} v={list(self.v_shape)} layout={self.layout}"
        )
