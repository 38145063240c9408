"""Head arithmetic (LANGUAGE.md section 3): the ``kv_head`` builtin and divisors of ``//`` and
``%`` that are call constants (literals, parameters, ``heads``, ``kv_heads``, ``q_len``,
``kv_len``): checked at compile time for their form, at call time for their value, and
computed alike by the reference, the analysis and both backends.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attndsl
from attndsl import AttnCallError, AttnError
from attndsl.blocks import block_map_by_tiles

SRC = """pattern chunks(parts = 4):
    mask = q // (kv_len // parts) == k // (kv_len // parts)

pattern shards:
    mask = causal and (k % heads == h or q == k)

pattern per_kv_head(flags: int[]):
    mask = causal and (flags[kv_head] == 1 or q - k < 3)

pattern group_window:
    mask = causal and q - k < 4 * (heads // kv_heads)
"""


@pytest.fixture(scope="module")
def prog():
    return attndsl.compile(SRC, "calls.attn")


def _qkv(heads, kv_heads, q_len, kv_len, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, q_len, d, generator=g, dtype=torch.float64),
            torch.randn(1, kv_heads, kv_len, d, generator=g, dtype=torch.float64),
            torch.randn(1, kv_heads, kv_len, d, generator=g, dtype=torch.float64))


def test_kv_head_is_the_key_value_head_of_h(prog):
    pat = prog["per_kv_head"]
    flags = np.array([1, 0, 0])
    got = pat.dense_mask(20, 20, heads=6, kv_heads=3, flags=flags)
    q, k = np.arange(20)[:, None], np.arange(20)[None, :]
    for h in range(6):
        want = (k <= q) & ((flags[h // 2] == 1) | (q - k < 3))
        assert np.array_equal(got[h], want), h


def test_kv_head_prints_as_what_it_means_and_parses_back(prog):
    text = str(prog["per_kv_head"])
    assert "flags[h // (heads // kv_heads)]" in text
    again = attndsl.compile(text)["per_kv_head"]
    assert again.ir == prog["per_kv_head"].ir


@pytest.mark.parametrize("mask, col", [("q % k == 0", 16), ("q // h == 0", 17),
                                       ("q // (q_len - k) == 0", 18), ("k % (q + 1) == 0", 17)])
def test_a_divisor_that_is_no_call_constant_is_a_type_error_at_the_divisor(mask, col):
    with pytest.raises(AttnError) as err:
        attndsl.compile(f"pattern p:\n    mask = {mask}\n", "d.attn")
    text = str(err.value)
    assert text.startswith(f"d.attn:2:{col}: error: the divisor of "), text
    assert "must be a call constant" in text and "^" in text


def test_a_constant_divisor_is_still_checked_when_compiled():
    with pytest.raises(AttnError, match=r"d\.attn:2:18: error: the divisor of '//' must be "
                                        r"greater than 0, got 0"):
        attndsl.compile("pattern p:\n    mask = q // (2 - 2) == 0\n", "d.attn")


def test_a_divisor_that_is_not_positive_at_a_call_is_an_error_naming_its_location(prog):
    pat = prog["chunks"]
    q, k, v = _qkv(1, 1, 3, 3)
    calls = [lambda: pat(q, k, v), lambda: pat(q, k, v, backend="triton-interpret"),
             lambda: pat.dense_mask(3, 3), lambda: pat.block_map(3, 3),
             lambda: pat.reference(q.numpy(), k.numpy(), v.numpy())]
    for call in calls:
        with pytest.raises(AttnCallError) as err:
            call()
        text = str(err.value)
        assert text.startswith("calls.attn:2:18: error: the divisor of '//' must be greater "
                               "than 0, got 0 at this call (q_len=3, kv_len=3"), text
        assert "mask = q // (kv_len // parts)" in text and "^" in text
        assert not re.search(r"attndsl\.|Traceback|numpy", text), text
    assert pat(*_qkv(1, 1, 4, 4)).shape == (1, 1, 4, 8)         # 4 keys: chunks of one


@pytest.mark.parametrize("name, heads, kv_heads", [("chunks", 2, 1), ("shards", 4, 2),
                                                   ("per_kv_head", 6, 3), ("group_window", 4, 1),
                                                   ("group_window", 4, 4)])
@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (20, 45)])
def test_backends_and_analysis_agree_with_the_reference(prog, name, heads, kv_heads, q_len,
                                                         kv_len):
    pat = prog[name]
    tensors = {"flags": np.array([1, 0, 1])} if name == "per_kv_head" else {}
    q, k, v = _qkv(heads, kv_heads, q_len, kv_len)
    ref, ref_lse = pat.reference(q.numpy(), k.numpy(), v.numpy(), **tensors)
    given = {n: torch.as_tensor(t) for n, t in tensors.items()}
    for backend, tol in (("torch", 1e-10), ("triton-interpret", 2e-5)):
        out, lse = pat(q, k, v, return_lse=True, backend=backend, **given)
        np.testing.assert_allclose(out.double().numpy(), ref, atol=tol, err_msg=backend)
        np.testing.assert_allclose(lse.double().numpy(), ref_lse, atol=tol, err_msg=backend)
    for block in ((8, 8), (16, 4), (5, 7)):
        got = pat.block_map(q_len, kv_len, heads, block=block, kv_heads=kv_heads, **tensors)
        brute = block_map_by_tiles(pat.grid(q_len, kv_len, heads, kv_heads, tensors), block)
        assert not ((got == 0) & (brute != 0)).any() and not ((got == 2) & (brute != 2)).any()
        assert np.array_equal(got, brute), (name, block)
