"""The Hugging Face transformers hook (attndsl/hf.py) on a tiny random-initialised Llama.

The oracle is transformers itself: the dense causal pattern through the hook against
``attn_implementation="sdpa"``, and sparse patterns against SDPA given a 4-D mask built here by
hand, in torch, from each row's token positions (independent of attndsl). Positions under left
padding are token positions: row b of a padded batch must give the logits of row b alone.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from conftest import pattern  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from attndsl import AttnCallError  # noqa: E402

hf = pytest.importorskip("attndsl.hf")

VOCAB = 128
PAD = 0
CAUSAL = "pattern causal_only:\n    mask = causal\n"
STREAMING = "pattern streaming(n = 2, w = 3):\n    mask = causal and (sinks(n) or sliding(w))\n"
PREFIX = "pattern prefix_lm(p = 3):\n    mask = prefix(p)\n"
BIASED = ("pattern biased(rel: float[], d = 7):\n    mask = causal\n"
          "    score = score + rel[clamp(q - k, 0, d)]\n")


# ----------------------------------------------------------------------------- helpers
def tiny_llama(kv_heads: int = 2, dtype=torch.float32, seed: int = 0, **extra):
    """2 layers, hidden 64, 4 query heads of 16, vocab 128, random weights, SDPA attention."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                      eos_token_id=2, attn_implementation="sdpa", **extra)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def left_padded(lengths=(12, 8, 5), seed: int = 1):
    """Token ids and a 2-D attention mask of rows of different lengths, padded on the left."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), n), dtype=torch.long)
    for b, length in enumerate(lengths):
        ids[b, n - length:] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[b, n - length:] = 1
    return ids, mask


def generate_positions(mask):
    """position_ids as transformers' generate makes them: token positions, 1 at padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.fixture
def hook():
    """register() a pattern under a fresh name; every name is unregistered after the test."""
    names = []

    def make(src: str, name: str | None = None, **kw):
        name = name or f"attndsl_test_{len(names)}"
        names.append(hf.register(name, pattern(src), **kw))
        return name

    yield make
    for name in names:
        hf.unregister(name)


def logits(model, impl: str, ids, mask, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def hand_mask(allowed, mask, q_len: int):
    """SDPA's 4-D bool mask [B, 1, q_len, L] for the last q_len slots of a padded batch:
    ``allowed(pq, pk)`` on token positions (the row's own count), real keys only; a padding
    query sees itself (so SDPA has no empty row: its outputs are not compared)."""
    real = mask.bool()
    pos = mask.cumsum(-1) - 1
    n = mask.shape[1]
    pq, pk = pos[:, n - q_len:, None], pos[:, None, :]
    ok = allowed(pq, pk) & real[:, None, :] & real[:, n - q_len:, None]
    own = torch.arange(n - q_len, n)[:, None] == torch.arange(n)[None, :]
    ok = ok | (~real[:, n - q_len:, None] & own)
    return ok[:, None]


def streaming_allowed(n=2, w=3):
    return lambda pq, pk: (pk <= pq) & ((pk < n) | (pq - pk < w))


def close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max |diff| {err}"


# ----------------------------------------------------------------------------- dense causal == sdpa
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_causal_logits_equal_sdpa_with_left_padding(hook, kv_heads):
    model = tiny_llama(kv_heads)
    name = hook(CAUSAL)
    ids, mask = left_padded()
    ref, got = logits(model, "sdpa", ids, mask), logits(model, name, ids, mask)
    real = mask.bool()
    close(got[real], ref[real])
    assert torch.isfinite(got).all()


def test_causal_without_padding_and_one_row(hook):
    model = tiny_llama()
    name = hook(CAUSAL)
    ids, _ = left_padded((9, 9))
    close(logits(model, name, ids, None), logits(model, "sdpa", ids, None))
    close(logits(model, name, ids[:1], torch.ones_like(ids[:1])),
          logits(model, "sdpa", ids[:1], None))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_with_kv_cache_equals_sdpa(hook, cache):
    model = tiny_llama(kv_heads=2)
    name = hook(CAUSAL)
    ids, mask = left_padded()
    runs = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        runs[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    cache_implementation=cache, return_dict_in_generate=True,
                                    output_logits=True, pad_token_id=PAD)
    assert torch.equal(runs[name].sequences, runs["sdpa"].sequences)
    for got, ref in zip(runs[name].logits, runs["sdpa"].logits):
        close(got, ref)


def test_static_cache_uses_true_key_length_not_capacity(hook, monkeypatch):
    """Every decoding step sees the written slots only, the query last among them."""
    model = tiny_llama()
    name = hook(CAUSAL)
    ids, mask = left_padded((6, 4))
    seen, inner = [], hf.attention

    def spy(h, module, q, k, v, m, *a, **kw):
        seen.append((q.shape[2], k.shape[2], m.shape[-1]))
        return inner(h, module, q, k, v, m, *a, **kw)

    monkeypatch.setattr(hf, "attention", spy)
    model.set_attn_implementation(name)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                   cache_implementation="static", pad_token_id=PAD)
    capacity = seen[0][1]
    assert all(k == capacity for _, k, _ in seen) and capacity > 6, seen
    assert [s[2] for s in seen] == [6, 6, 7, 7, 8, 8], seen    # 2 layers per step


# ----------------------------------------------------------------------------- sparse, positions
def test_sparse_pattern_equals_hand_made_mask_through_sdpa(hook):
    model = tiny_llama(kv_heads=2)
    name = hook(STREAMING)
    ids, mask = left_padded()
    got = logits(model, name, ids, mask)
    ref = logits(model, "sdpa", ids, hand_mask(streaming_allowed(), mask, ids.shape[1]))
    real = mask.bool()
    close(got[real], ref[real])
    dense = logits(model, "sdpa", ids, mask)
    assert (got[real] - dense[real]).abs().max() > 1e-3       # the window changes the output


def test_prefix_lm_stays_bidirectional_under_padding(hook):
    """The mask function gives padding only: transformers' causal mask would cut the prefix."""
    model = tiny_llama()
    name = hook(PREFIX)
    ids, mask = left_padded()
    got = logits(model, name, ids, mask)
    ref = logits(model, "sdpa", ids, hand_mask(lambda pq, pk: (pk <= pq) | (pk < 3), mask,
                                                ids.shape[1]))
    real = mask.bool()
    close(got[real], ref[real])


@pytest.mark.parametrize("src", [STREAMING, PREFIX], ids=["sinks", "prefix"])
def test_padded_row_sees_its_own_token_positions(hook, src):
    """Absolute-position patterns: a padded row gives the logits of that row run alone."""
    model = tiny_llama()
    name = hook(src)
    ids, mask = left_padded()
    batch = logits(model, name, ids, mask, position_ids=generate_positions(mask))
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = logits(model, name, ids[b:b + 1, real], None)
        close(batch[b, real], alone[0])


def test_sparse_generation_with_cache_equals_hand_made_masks_without_cache(hook):
    """Greedy decoding through the hook (DynamicCache, left padding, sinks + window) against
    SDPA recomputing the whole sequence at each step under the hand-made mask."""
    model = tiny_llama(kv_heads=2)
    name = hook(STREAMING)
    ids, mask = left_padded()
    model.set_attn_implementation(name)
    run = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
    seq, att = ids, mask
    for step in range(5):
        full = logits(model, "sdpa", seq, hand_mask(streaming_allowed(), att, seq.shape[1]),
                      position_ids=generate_positions(att))
        close(run.logits[step], full[:, -1])
        nxt = full[:, -1].argmax(-1, keepdim=True)
        seq, att = torch.cat([seq, nxt], 1), torch.cat([att, torch.ones_like(nxt)], 1)
    assert torch.equal(run.sequences, seq)


def test_batched_tensor_input_is_indexed_by_each_rows_token_positions(hook):
    """A tensor input with a batch dimension: row b reads its own, at token positions."""
    model = tiny_llama()
    ids, mask = left_padded()
    flag = torch.rand(ids.shape[0], ids.shape[1], generator=torch.Generator().manual_seed(3)) < 0.3
    name = hook("pattern flagged(flag: bool[]):\n    mask = causal and (flag[k] or sliding(2))\n",
                flag=flag)

    def allowed(pq, pk):
        flagged = torch.gather(flag, 1, pk[:, 0].clamp(min=0))[:, None]
        return (pk <= pq) & (flagged | (pq - pk < 2))

    got = logits(model, name, ids, mask)
    ref = logits(model, "sdpa", ids, hand_mask(allowed, mask, ids.shape[1]))
    real = mask.bool()
    close(got[real], ref[real])


# ----------------------------------------------------------------------------- dtypes, training
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2),
                                       (torch.float16, 5e-3)])
def test_dtypes(hook, dtype, tol):
    model = tiny_llama(dtype=dtype)
    name = hook(CAUSAL)
    ids, mask = left_padded()
    got, ref = logits(model, name, ids, mask), logits(model, "sdpa", ids, mask)
    assert got.dtype == dtype
    real = mask.bool()
    close(got[real].double(), ref[real].double(), tol)


def _loss(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))


def test_training_gradients_equal_sdpa(hook):
    model = tiny_llama(kv_heads=2).train()
    name = hook(CAUSAL)
    ids, mask = left_padded()
    grads = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        model.zero_grad()
        _loss(model, ids, mask).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["sdpa"].items():
        assert g.abs().max() > 0 or "embed" in n
        close(grads[name][n], g, 1e-4)


def test_learned_tensor_input_gets_a_gradient(hook):
    """A float tensor input given to register() is trained with the model."""
    model = tiny_llama().train()
    rel = torch.nn.Parameter(torch.zeros(8))
    name = hook(BIASED, rel=rel)
    ids, mask = left_padded()
    model.set_attn_implementation(name)
    _loss(model, ids, mask).backward()
    assert rel.grad is not None and rel.grad.abs().max() > 0
    model.eval()
    real = mask.bool()
    close(logits(model, name, ids, mask)[real], logits(model, "sdpa", ids, mask)[real])


def test_from_pretrained_with_the_registered_name(hook, tmp_path):
    model = tiny_llama()
    name = hook(CAUSAL)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    ids, mask = left_padded()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    close(got[real], logits(model, "sdpa", ids, mask)[real])


# ----------------------------------------------------------------------------- clear errors
def test_register_errors(hook):
    causal = pattern(CAUSAL)
    with pytest.raises(AttnCallError, match="implementation of transformers itself"):
        hf.register("sdpa", causal)
    with pytest.raises(AttnCallError, match="needs its tensor input 'rel'"):
        hf.register("attndsl_test_x", pattern(BIASED))
    with pytest.raises(AttnCallError, match="no tensor input 'bias'"):
        hf.register("attndsl_test_x", causal, bias=torch.zeros(3))
    with pytest.raises(AttnCallError, match="needs a value for parameter 'w'"):
        hf.register("attndsl_test_x", pattern("pattern s(w: int):\n    mask = sliding(w)\n"))
    with pytest.raises(AttnCallError, match="backend must be one of"):
        hf.register("attndsl_test_x", causal, backend="cuda")
    with pytest.raises(AttnCallError, match="must be an attndsl.Pattern"):
        hf.register("attndsl_test_x", CAUSAL)
    assert "attndsl_test_x" not in hf.registered()
    with pytest.raises(AttnCallError, match="no attndsl pattern is registered"):
        hf.unregister("sdpa")


def test_call_errors(hook):
    model = tiny_llama()
    name = hook(CAUSAL)
    ids, mask = left_padded((6, 6))
    four_d = hand_mask(lambda pq, pk: pk <= pq, mask, 6)
    with pytest.raises(AttnCallError, match="a mask prepared for another implementation"):
        logits(model, name, ids, four_d.float())
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    with pytest.raises(AttnCallError, match="packed sequences"):
        logits(model, name, ids, None, position_ids=packed)
    dropout = tiny_llama(attention_dropout=0.1).train()
    dropout.set_attn_implementation(name)
    with pytest.raises(AttnCallError, match="runs no attention dropout"):
        dropout(input_ids=ids, attention_mask=mask)


def test_a_cache_that_drops_keys_is_refused(hook):
    """A sliding-window cache layer keeps only its last keys: their positions are unknown."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=4, pad_token_id=PAD)
    model = MistralForCausalLM(cfg).eval()
    name = hook(CAUSAL)
    model.set_attn_implementation(name)
    ids, mask = left_padded((3,))
    with pytest.raises(AttnCallError, match="keeps only its last keys"):
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                       pad_token_id=PAD)


def test_transformers_is_optional():
    """``import attndsl`` does not import transformers; attndsl.hf without it says what to
    install."""
    code = ("import sys, attndsl\n"
            "assert 'transformers' not in sys.modules\n"
            "sys.modules['transformers'] = None\n"
            "try:\n"
            "    import attndsl.hf\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install attndsl[hf]" in out.stdout


def test_example_script(capsys):
    """examples/hf/llama_sparse.py runs (small sizes) and its checks pass."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hf" / "llama_sparse.py"
    spec = importlib.util.spec_from_file_location("llama_sparse_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--lengths", "11,4", "--new-tokens", "6", "--window", "6"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "PASS dense causal pattern" in out
    assert "PASS row 1 (after 7 padding slots): its first 5 generated tokens" in out
    assert "streaming ->" in out
