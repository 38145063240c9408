"""Messages a newcomer meets: an index out of range in the score clause at a masked pair, the
demo inputs of patterns whose tensor inputs index each other, and the compile targets of
``emit --compile`` (attndsl/interp.py, attndsl/render.py, codegen/aot.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attndsl
from attndsl.render import demo_inputs

BIAS = "pattern p(bias: float[]):\n    mask = causal\n    score = score + bias[q - k]\n"
T5 = ("pattern t5(bucket: int[], rel: float[][]):\n    mask = causal\n"
      "    score = score + rel[h, bucket[abs(q - k)]]\n")


def _qkv(n: int = 4, heads: int = 1):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, n, 8, generator=g) for _ in range(3))


# ------------------------------------------------------------------ an index at a masked pair
@pytest.mark.parametrize("backend", ["reference", "torch", "triton-interpret"])
def test_a_negative_index_at_a_masked_pair_says_why_it_is_evaluated(backend):
    """The score clause is evaluated at every pair, masked ones included (LANGUAGE.md sections 1
    and 3): the message says so and names the index expression, its value, the tensor and the
    (h, q, k) where it is evaluated, at the index's line and column."""
    pat = attndsl.compile(BIAS, filename="bias.attn")["p"]
    q, k, v = _qkv()
    with pytest.raises(attndsl.AttnCallError) as info:
        if backend == "reference":
            pat.reference(q, k, v, bias=np.zeros(4))
        else:
            pat(q, k, v, backend=backend, bias=torch.zeros(4))
    err = info.value
    assert (err.line, err.column) == (3, 21)
    msg = err.message
    assert "index -1 is out of range for tensor input 'bias' of size 4" in msg
    assert "the index 'q - k' is -1 at h=0, q=0, k=1" in msg
    assert "score clause is evaluated at every (h, q, k) pair, masked pairs included" in msg
    assert "if q - k >= 0 else" in msg


def test_an_index_out_of_range_in_the_mask_says_where_the_mask_evaluates_it():
    pat = attndsl.compile("pattern p(doc: int[]):\n    mask = doc[q + 1] == doc[k]\n")["p"]
    q, k, v = _qkv()
    with pytest.raises(attndsl.AttnCallError) as info:
        pat.reference(q[:, :, :2], k, v, doc=np.zeros(4, np.int64))
    msg = info.value.message
    assert "the index 'q + 1' is 4 at h=0, q=3, k=0 (query row 1)" in msg
    assert "masked pairs included" not in msg and "'and', 'or' or 'if'" in msg
    assert "if q + 1 < 4 else" in msg


# ------------------------------------------------------------------ demo inputs
def test_demo_inputs_fill_an_index_tensor_before_the_tensor_it_indexes():
    """t5-style ``rel[h, bucket[...]]``: rel's shape comes from bucket's values, so bucket is
    filled first (before, rel was probed while bucket read as 0: shape [heads, 1])."""
    pat = attndsl.compile(T5)["t5"]
    tensors, notes = demo_inputs(pat, (16, 16, 2, 2), 8, np.random.default_rng(0))
    bucket, rel = tensors["bucket"], tensors["rel"]
    assert bucket.shape == (16,) and rel.shape == (2, int(bucket.max()) + 1)
    q, k, v = _qkv(16, 2)
    out, lse = pat.reference(q, k, v, **tensors)          # every index in range
    assert np.isfinite(lse).all()
    assert [n.split(":")[0] for n in notes] == ["bucket", "rel"]


def test_demo_inputs_say_why_no_value_fits_without_blaming_the_lengths():
    pat = attndsl.compile(BIAS.replace("bias[q - k]", "rel[h, bucket[q - k]]")
                          .replace("bias: float[]", "bucket: int[], rel: float[][]"))["p"]
    with pytest.raises(attndsl.AttnCallError) as info:
        demo_inputs(pat, (8, 8, 1, 1), 8, np.random.default_rng(0))
    msg = info.value.message
    assert "q_len > kv_len" not in msg and "1099511627776" not in msg
    assert "masked pairs included" in msg and "'bucket'" in msg


# ------------------------------------------------------------------ compile targets
@pytest.mark.parametrize("target,why", [("sm_42", "no NVIDIA GPU architecture"),
                                        ("sm_80a", "'a' form exists from sm_90"),
                                        ("sm_999", "no NVIDIA GPU architecture"),
                                        ("gfx90a", "expected sm_<capability>")])
def test_unknown_targets_are_refused_before_compiling(target, why):
    from attndsl.codegen import aot

    pat = attndsl.compile("pattern c:\n    mask = causal\n")["c"]
    with pytest.raises(attndsl.AttnCallError, match=why):
        aot.check_targets([target])
    with pytest.raises(attndsl.AttnCallError, match=why):
        aot.pattern_jobs(pat, aot.Call(), targets=["sm_90", target])
    assert aot.check_targets([" sm_90a", "sm_80", "sm_80 ", "sm_120"]) == ["sm_90a", "sm_80",
                                                                           "sm_120"]
