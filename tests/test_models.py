"""Every attention region of small real models is fused, and the compiled models match eager.

Hugging Face transformers (eager attention) and timm models built from tiny configs with
random weights, plus a hand-written nanoGPT block. For each model:
  - eval mode: every attention layer fused; outputs and all parameter grads match eager,
    including HF's finfo.min padding masks and query rows whose every key is masked;
  - train mode with dropout p = 0: the same (eager and compiled draw different dropout masks,
    so p > 0 cannot be compared numerically);
  - train mode with dropout p > 0: every attention layer still fuses, with the op's dropout.
A model whose attention the pass refuses says so: a strict xfail that names the reason.

Needs `pip install -c <(echo torch==$(python -c 'import torch;print(torch.__version__.split("+")[0])')) transformers timm`;
skipped without them. Grads are compared with atol 5e-4: whole-model fp32 grads reach ~300,
and summing ~1e-7 relative differences of the fused softmax over them moves the smallest
entries by a few 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import flashfuse
from flashfuse.testing import assert_fused, assert_matches_eager
from models import CASES, ModelCase

pytestmark = pytest.mark.models

OPTIONS = {"kernel": "reference", "compiler": "aot_eager"}
TOL = dict(rtol=1e-4, atol=5e-4)
DROPOUT = 0.1


def _params(case: ModelCase):
    marks = []
    if case.refusal:
        marks.append(pytest.mark.xfail(reason=f"refused [{case.refusal}]: {case.note}", strict=True))
    return pytest.param(case, id=case.name, marks=marks)


def _check_fused(case: ModelCase, model, inputs):
    report = assert_fused(model, **inputs, count=case.attention_layers, options=OPTIONS)
    assert not report.refused, f"{case.name}: refused regions\n{report}"
    return report


def _counted_matches(case: ModelCase, model, inputs):
    # One compile for both checks: the counters say what the backend fused in this compile.
    counters.clear()
    torch._dynamo.reset()
    assert_matches_eager(model, **inputs, options=OPTIONS, **TOL)
    fused = counters["flashfuse"]["fused"]
    refused = {k: v for k, v in counters["flashfuse"].items() if k.startswith("refused_")}
    assert fused == case.attention_layers and not refused, f"{case.name}: fused {fused}, refused {refused}"


@pytest.mark.parametrize("case", [_params(c) for c in CASES])
def test_eval_fused_and_matches_eager(case):
    model = case.build(0.0).eval()
    _counted_matches(case, model, case.inputs())


@pytest.mark.parametrize("case", [_params(c) for c in CASES])
def test_train_no_dropout_matches_eager(case):
    model = case.build(0.0).train()
    _counted_matches(case, model, case.inputs())


@pytest.mark.parametrize("case", [_params(c) for c in CASES])
def test_train_with_dropout_still_fuses(case):
    model = case.build(DROPOUT).train()
    report = _check_fused(case, model, case.inputs())
    if case.dropout:
        assert all(r.spec.dropout_p == pytest.approx(DROPOUT) for r in report.fused), [r.spec.summary() for r in report.fused]


def test_output_attentions_is_refused():
    """HF returns the probabilities with output_attentions=True: the pass must keep the graph."""
    case = next(c for c in CASES if c.name == "bert")
    model = case.build(0.0).eval()
    report = flashfuse.explain(model, **case.inputs(), output_attentions=True, options=OPTIONS)
    assert not report.fused
    assert [r.reason for r in report.refused] == ["probs_reused"] * case.attention_layers, str(report)


def test_gpt2_causal_mask_past_the_folding_limit_becomes_causal():
    """HF builds GPT-2's causal mask per batch: at B=8, N=1024 it has 8.4M elements, too many to
    constant-fold, so only the structural prover can find it causal. When it could not (HF 5.x's
    construction), the mask reached every op call as a tensor: 2x slower GPT-2 training on an H100
    (benchmarks/results/NOTES.md, 2026-11-22)."""
    from models import require

    T = require("transformers")
    cfg = T.GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=1, n_positions=1024, attn_implementation="eager")
    torch.manual_seed(0)
    model = T.GPT2Model(cfg).eval()
    ids = torch.randint(0, 96, (8, 1024), generator=torch.Generator().manual_seed(1))
    report = flashfuse.explain(model, input_ids=ids, options={"kernel": "reference", "compiler": "eager"})
    assert len(report.fused) == 1, str(report)
    spec = report.fused[0].spec
    assert spec.causal and not spec.mask_shapes and not spec.bias_shapes, spec.summary()
    want = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(report.result.last_hidden_state[:, -32:], want[:, -32:], **TOL)
