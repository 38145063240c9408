"""Non-finite values (docs/language.md, "Non-finite values"): every backend agrees with the
reference, and the reference follows the contract's sums over *allowed* keys.

* A NaN or +inf score at an allowed pair makes that row's output NaN and its lse NaN (any NaN)
  or +inf; a -inf score means "not allowed". NaN or infinities in Q or K reach exactly the rows
  and pairs whose scores they make non-finite. Other rows are never affected.
* V is read at allowed keys only: a non-finite V entry at a key a row may not see (masked, in a
  skipped tile, beyond kv_len) never reaches it; at an allowed key it makes that output entry
  that infinity, or NaN (a NaN, or both signs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_values

import attndsl
from attndsl.reference import attend

BACKENDS = ("torch", "triton-interpret")
NAN, INF = float("nan"), float("inf")

PROG = attndsl.compile("""
pattern causal_p:
    mask = causal
pattern window(w = 8):
    mask = sliding(w)
pattern docs(doc: int[]):
    mask = doc[q] == doc[k]
pattern pinf:
    mask = causal
    score = score + (inf if q == 5 and k == 2 else 0.0)
pattern pnan:
    mask = causal
    score = score + (0.0 * inf if q == 5 and k == 2 else 0.0)
pattern masked_nan:
    mask = causal
    score = score + (0.0 * inf if k > q else 0.0)
pattern all_minus_inf:
    mask = causal
    score = -inf if q == 6 else score
pattern bias(b: float[]):
    mask = causal
    score = score + b[k]
pattern dil:
    mask = dilated(4, 3)
""", filename="<nonfinite>")


def run_all(pat, q, k, v, tol=2e-5, **tensors):
    """Every backend against the reference; returns the reference (out, lse)."""
    ref_out, ref_lse = pat.reference(q, k, v, **tensors)
    for backend in BACKENDS:
        out, lse = pat(q, k, v, return_lse=True, backend=backend, **tensors)
        assert_same_values(ref_out, out, tol)
        assert_same_values(ref_lse, lse, tol)
    return ref_out, ref_lse


def operands(seed=0, batch=1, heads=2, kv_heads=1, q_len=40, kv_len=40, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, d, generator=g),
            torch.randn(batch, kv_heads, kv_len, d, generator=g),
            torch.randn(batch, kv_heads, kv_len, d, generator=g))


# ----------------------------------------------------------------------------- scores


def test_plus_inf_score_gives_nan_output_and_plus_inf_lse():
    q, k, v = operands()
    out, lse = run_all(PROG["pinf"], q, k, v)
    assert np.isposinf(lse[0, :, 5]).all() and np.isnan(out[0, :, 5]).all()
    rest = np.arange(40) != 5
    assert np.isfinite(lse[0][:, rest]).all() and np.isfinite(out[0][:, rest]).all()


def test_nan_score_gives_nan_output_and_nan_lse():
    q, k, v = operands()
    out, lse = run_all(PROG["pnan"], q, k, v)
    assert np.isnan(lse[0, :, 5]).all() and np.isnan(out[0, :, 5]).all()
    assert np.isfinite(np.delete(lse[0], 5, axis=1)).all()


def test_nan_score_at_a_masked_pair_is_ignored():
    q, k, v = operands()
    out, lse = run_all(PROG["masked_nan"], q, k, v)
    assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_minus_inf_scores_leave_an_empty_row():
    q, k, v = operands()
    out, lse = run_all(PROG["all_minus_inf"], q, k, v)
    assert np.isneginf(lse[0, :, 6]).all() and (out[0, :, 6] == 0).all()


def test_nan_and_plus_inf_in_one_row_give_nan():
    q, k, v = operands()
    b = torch.zeros(40)
    b[3], b[9] = NAN, INF
    _, lse = run_all(PROG["bias"], q, k, v, b=b)
    assert np.isneginf(lse).sum() == 0
    assert np.isnan(lse[0, :, 9:]).all()                # rows that see both keys 3 and 9
    assert np.isnan(lse[0, :, 3:9]).all()               # rows that see key 3 only
    assert np.isfinite(lse[0, :, :3]).all()


def test_plus_inf_bias_alone_gives_plus_inf_lse():
    q, k, v = operands()
    b = torch.zeros(40)
    b[7] = INF
    out, lse = run_all(PROG["bias"], q, k, v, b=b)
    assert np.isposinf(lse[0, :, 7:]).all() and np.isnan(out[0, :, 7:]).all()
    assert np.isfinite(out[0, :, :7]).all()


@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_query_or_key_reach_only_their_pairs(where, value):
    q, k, v = operands(seed=1)
    (q if where == "query" else k)[0, 0, 11, 3] = value
    out, lse = run_all(PROG["causal_p"], q, k, v)
    if where == "query":                                # row 11 of head 0 only
        rest = np.arange(40) != 11
        assert np.isfinite(lse[0][:, rest]).all() and np.isfinite(lse[0, 1, 11])
        assert not np.isfinite(lse[0, 0, 11]) and np.isnan(out[0, 0, 11]).all()
    else:                                               # rows 0..10 never see key 11
        assert np.isfinite(lse[0, :, :11]).all() and np.isfinite(out[0, :, :11]).all()


def test_nan_query_row_is_not_reported_empty():
    q, k, v = operands()
    q[0, 1, 20] = NAN
    out, lse = run_all(PROG["window"], q, k, v)
    assert np.isnan(lse[0, 1, 20]) and np.isnan(out[0, 1, 20]).all()
    assert np.isfinite(lse[0, 0]).all()


def test_nan_key_is_not_treated_as_disallowed():
    q, k, v = operands()
    k[0, 0, 30] = NAN
    _, lse = run_all(PROG["window"], q, k, v)
    assert np.isnan(lse[0, :, 30:38]).all()             # the rows whose window holds key 30
    assert np.isfinite(lse[0, :, :30]).all() and np.isfinite(lse[0, :, 38:]).all()


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_value_in_another_document_does_not_poison_a_row(value):
    q, k, v = operands(q_len=48, kv_len=48)
    doc = torch.tensor([0] * 13 + [1] * 21 + [2] * 14)   # documents cross tile edges
    v[0, 0, 20, 5] = value
    out, _ = run_all(PROG["docs"], q, k, v, doc=doc)
    inside = (doc == 1).numpy()
    assert np.isfinite(out[0][:, ~inside]).all()
    col = out[0][:, inside, 5]
    assert (np.isnan(col) if value != value else col == value).all()
    assert np.isfinite(np.delete(out[0][:, inside], 5, axis=-1)).all()


def test_values_in_skipped_tiles_never_matter():
    q, k, v = operands(q_len=200, kv_len=200)
    v[0, 0, :40] = NAN                                  # far behind every window from row 60 on
    v[0, 0, 100, 0] = INF
    out, _ = run_all(PROG["window"], q, k, v)
    assert np.isfinite(out[0, :, 48:100]).all() and np.isfinite(out[0, :, 108:]).all()
    assert np.isposinf(out[0, :, 100:108, 0]).all()


def test_values_beyond_kv_len_never_matter():
    """K and V are views into storage that holds NaN past kv_len: a load out of range shows."""
    q, _, _ = operands(q_len=37, kv_len=37)
    storage_k = torch.full((1, 1, 37 + 64, 16), NAN)
    storage_v = torch.full((1, 1, 37 + 64, 16), NAN)
    storage_k[:, :, :37] = torch.randn(1, 1, 37, 16)
    storage_v[:, :, :37] = torch.randn(1, 1, 37, 16)
    k, v = storage_k[:, :, :37], storage_v[:, :, :37]
    for name in ("causal_p", "window"):
        out, lse = run_all(PROG[name], q, k, v)
        assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_both_infinities_at_allowed_keys_give_nan_and_one_gives_itself():
    q, k, v = operands()
    v[0, 0, 4, 2] = INF
    v[0, 0, 9, 2] = -INF
    v[0, 0, 4, 3] = INF
    out, _ = run_all(PROG["causal_p"], q, k, v)
    assert np.isposinf(out[0, :, 4:9, 2]).all() and np.isnan(out[0, :, 9:, 2]).all()
    assert np.isposinf(out[0, :, 4:, 3]).all()
    assert np.isfinite(out[0, :, :4]).all()


def test_gathered_components_merge_non_finite_rows():
    q, k, v = operands(q_len=64, kv_len=64)
    k[0, 0, 30] = NAN
    v[0, 0, 33, 1] = INF
    out, lse = run_all(PROG["dil"], q, k, v)
    assert np.isnan(lse).any() and np.isposinf(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_keep_the_rules(dtype):
    q, k, v = (x.to(dtype) for x in operands())
    k[0, 0, 11] = NAN
    v[0, 0, 3, 0] = INF
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    run_all(PROG["window"], q, k, v, tol=tol)


def test_float64_calls_return_a_float64_lse_on_every_backend():
    q, k, v = (x.double() for x in operands())
    for backend in BACKENDS:
        _, lse = PROG["window"](q, k, v, return_lse=True, backend=backend)
        assert lse.dtype == torch.float64


# ----------------------------------------------------------------------------- the reference


def test_attend_reads_values_of_allowed_keys_only():
    allowed = np.array([[True, False], [True, True]])
    s = np.zeros((2, 2))
    v = np.array([[1.0, 2.0], [NAN, -INF]])
    out, lse = attend(allowed, s, v)
    np.testing.assert_array_equal(out[0], [1.0, 2.0])
    assert np.isnan(out[1, 0]) and np.isneginf(out[1, 1])
    np.testing.assert_allclose(lse, [0.0, np.log(2.0)])


def test_attend_weights_underflow_does_not_hide_an_infinite_value():
    """In exact arithmetic every allowed key has a positive weight."""
    allowed = np.ones((1, 2), dtype=bool)
    s = np.array([[0.0, -2000.0]])                     # exp(-2000) underflows in float64
    v = np.array([[1.0], [INF]])
    out, _ = attend(allowed, s, v)
    assert np.isposinf(out[0, 0])


def test_full_tiles_read_values_at_allowed_keys_only():
    """In a full tile every key passes the mask, but a -inf score (from an infinite key) still
    makes a key not allowed, and an allowed key whose weight underflows still brings its
    infinite value."""
    q, k, v = operands(q_len=64, kv_len=64)
    q = q.abs() + 0.5                                   # positive queries: k = -inf gives -inf
    k[0, 0, 3] = 1.0
    k[0, 0, 3, 0] = -INF
    v[0, 0, 3, 1] = NAN                                 # key 3 is never allowed
    k[0, 0, 5] = -200.0                                 # key 5's weight underflows to 0 ...
    v[0, 0, 5, 2] = INF                                 # ... but its value is infinite
    out, lse = run_all(PROG["causal_p"], q, k, v)
    assert np.isfinite(out[0, :, :, 1]).all() and np.isfinite(lse).all()
    assert np.isposinf(out[0, :, 5:, 2]).all() and np.isfinite(out[0, :, :5, 2]).all()


def test_the_redo_launch_leaves_unflagged_programs_alone_and_redoes_flagged_ones():
    """On a GPU the SAFE_V launch always runs (its programs read one flag); under the
    interpreter only when a flag is set: both ways give the first launch's result."""
    from attndsl.runtime import launches

    pat = PROG["window"]
    q, k, v = operands(q_len=70, kv_len=70)
    (launch,), _ = launches(pat.bound(), q, k, v, 0.25)
    out, lse, redo = launch.args[3], launch.args[4], launch.args[5]
    fn = launch.kernel[launch.grid]
    fn(*launch.args, **launch.constants, **launch.options)
    assert not redo.any()
    first = out.clone(), lse.clone()
    out.fill_(7.0)                                      # an unflagged program writes nothing
    fn(*launch.args, **{**launch.constants, "SAFE_V": True}, **launch.options)
    assert (out == 7.0).all()
    redo.fill_(1)                                       # a flagged one writes its rows again
    fn(*launch.args, **{**launch.constants, "SAFE_V": True}, **launch.options)
    torch.testing.assert_close(out, first[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, first[1], rtol=1e-6, atol=1e-6)
