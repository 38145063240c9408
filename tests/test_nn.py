"""``attndsl.nn.Attention``: a pattern as a torch module whose constructor-given tensor inputs
are module state (learned float tables as parameters, the others as buffers), usable in a model:
training, ``state_dict``, ``.to()``, deepcopy and pickling, ``torch.compile``."""

from __future__ import annotations

import copy
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import pattern
from torch import nn

import attndsl.nn
from attndsl import AttnCallError

SOURCE = """\
pattern mixed(rel: float[][], gate: float[], doc: int[], flag: bool[], max_dist = 4):
    mask = (causal and doc[q] == doc[k] and gate[k] > -1.0) or flag[k]
    score = score + rel[h, clamp(q - k, 0, max_dist)]
"""

N, HEADS, D = 24, 2, 8
DOC = torch.tensor(np.repeat([0, 1, 2], [8, 10, 6]))


def _mixed():
    return pattern(SOURCE)


def _qkv(seed=0, n=N, heads=HEADS, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, D, generator=g) for _ in range(3)]


def _module(rel=None):
    flag = torch.zeros(N, dtype=torch.bool)
    flag[3] = True
    rel = torch.randn(HEADS, 5, generator=torch.Generator().manual_seed(1)) if rel is None else rel
    return attndsl.nn.Attention(_mixed(), rel=rel, gate=(N,), doc=DOC, flag=flag)


def test_learned_float_inputs_are_parameters_and_the_others_buffers():
    m = _module()
    assert [n for n, _ in m.named_parameters()] == ["rel"]
    assert sorted(n for n, _ in m.named_buffers()) == ["doc", "flag", "gate"]
    assert isinstance(m.rel, nn.Parameter) and m.rel.requires_grad
    assert m.gate.dtype == torch.get_default_dtype() and not m.gate.any()   # zeros of (N,)
    assert m.doc.dtype == torch.int64 and m.flag.dtype == torch.bool
    assert sorted(m.state_dict()) == ["doc", "flag", "gate", "rel"]
    shapes = attndsl.nn.Attention(_mixed(), rel=(3, 5), doc=(7,), flag=torch.Size([2]))
    assert shapes.rel.shape == (3, 5) and not shapes.rel.any()
    assert shapes.doc.dtype == torch.int64 and shapes.flag.dtype == torch.bool
    assert "mixed(max_dist=4)" in repr(shapes) and "call inputs: gate" in repr(shapes)


def test_values_are_copied_not_shared():
    rel = torch.randn(HEADS, 5)
    m = _module(rel)
    with torch.no_grad():
        m.rel.add_(1.0)
    assert torch.equal(m.rel.detach(), rel + 1.0) and not torch.equal(m.rel.detach(), rel)
    from_numpy = attndsl.nn.Attention(_mixed(), rel=np.ones((HEADS, 5), np.float32))
    assert isinstance(from_numpy.rel, nn.Parameter) and from_numpy.rel.dtype == torch.float32
    ints = attndsl.nn.Attention(_mixed(), rel=np.ones((HEADS, 5), np.int64))
    assert ints.rel.dtype == torch.get_default_dtype()      # a float input holds floats


def test_forward_is_the_pattern_call_with_the_module_state():
    m = _module()
    q, k, v = _qkv()
    state = {n: getattr(m, n) for n in ("rel", "gate", "doc", "flag")}
    out, lse = m(q, k, v, return_lse=True)
    want_out, want_lse = _mixed()(q, k, v, return_lse=True, **state)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    ref_out, _ = _mixed().reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                    **{n: t.detach().numpy() for n, t in state.items()})
    assert np.abs(out.detach().double().numpy() - ref_out).max() < 1e-5
    # an input left out of the constructor is passed to each call
    partial = attndsl.nn.Attention(_mixed(), rel=state["rel"].detach(), gate=(N,),
                                   flag=state["flag"])
    assert torch.equal(partial(q, k, v, doc=DOC), out)
    with pytest.raises(AttnCallError, match="missing tensor input 'doc'"):
        partial(q, k, v)
    with pytest.raises(AttnCallError, match=r"tensor input 'rel' is state of this module"):
        partial(q, k, v, doc=DOC, rel=state["rel"])


class TinyModel(nn.Module):
    """Projections around the attention module, as a transformer layer has them."""

    def __init__(self, attn):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D * HEADS)
        self.attn = attn

    def forward(self, x):                       # x [B, L, D]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        return self.attn(q, k, v).sum(1)        # [B, L, D]


def test_a_training_step_changes_the_bias_and_lowers_the_loss():
    torch.manual_seed(0)
    model = TinyModel(_module(rel=(HEADS, 5)))
    assert "attn.rel" in dict(model.named_parameters())
    x = torch.randn(2, N, D)
    target = torch.randn(2, N, D)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = model.attn.rel.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        assert model.attn.rel.grad is not None and model.attn.rel.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.attn.rel.detach(), before)
    assert torch.equal(model.attn.doc, DOC)              # buffers are not trained


def test_state_dict_round_trip_and_to():
    m = _module()
    fresh = attndsl.nn.Attention(_mixed(), rel=(HEADS, 5), gate=(N,), doc=(N,),
                                 flag=torch.zeros(N, dtype=torch.bool))
    fresh.load_state_dict(m.state_dict())
    q, k, v = _qkv(seed=3)
    assert torch.equal(fresh(q, k, v), m(q, k, v))
    wide = copy.deepcopy(m).to(torch.float64)
    assert wide.rel.dtype == wide.gate.dtype == torch.float64
    assert wide.doc.dtype == torch.int64 and wide.flag.dtype == torch.bool
    out = wide(*(t.double() for t in (q, k, v)))
    assert out.dtype == torch.float64 and torch.allclose(out.float(), m(q, k, v), atol=1e-5)
    meta = copy.deepcopy(m).to("meta")                   # every tensor follows .to(device)
    assert {t.device.type for t in meta.state_dict().values()} == {"meta"}


def test_deepcopy_and_pickle_give_the_same_module():
    m = _module()
    q, k, v = _qkv(seed=4)
    clone = copy.deepcopy(m)
    assert clone.pattern is not m.pattern and torch.equal(clone(q, k, v), m(q, k, v))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(q, k, v), m(q, k, v))
    derived = attndsl.nn.Attention(pattern("pattern s(n = 1, b = 8):\n    mask = causal and "
                                           "(topk_blocks(n, b) or q // b == k // b)\n")
                                   .without_selectors())
    # a derived pattern (its IR is not its source's) travels as its printed IR
    again = copy.deepcopy(derived)
    assert again.pattern.bound().key == derived.pattern.bound().key
    assert torch.equal(again(q, k, v), derived(q, k, v))


@pytest.mark.parametrize("case", ["type", "unbound", "unknown", "scalar", "rank", "dtype",
                                  "list", "shape", "attribute"])
def test_constructor_errors(case):
    pat = _mixed()
    args, message = {
        "type": (("not a pattern",), {}), "unbound": ((pattern("pattern w(n: int):\n    mask = "
                                                               "sliding(n)\n"),), {}),
        "unknown": ((pat,), {"bias": (2, 5)}), "scalar": ((pat,), {"max_dist": (1,)}),
        "rank": ((pat,), {"rel": torch.zeros(1, 2, 5, 3)}),
        "dtype": ((pat,), {"doc": torch.zeros(N)}),
        "list": ((pat,), {"rel": [[0.0] * 5] * 2}), "shape": ((pat,), {"rel": (2,)}),
        "attribute": ((pattern("pattern t(training: float[]):\n    mask = causal\n    score = "
                               "score + training[k]\n"),), {"training": (N,)}),
    }[case], {
        "type": "takes an attndsl.Pattern, got str", "unbound": "needs a value for parameter 'n'",
        "unknown": "has no tensor input 'bias' (its tensor inputs: rel, gate, doc, flag)",
        "scalar": "'max_dist' is a compile-time parameter of pattern 'mixed'",
        "rank": "tensor input 'rel' is declared float[][]", "dtype": "needs integers",
        "list": "pass a torch tensor or a NumPy array", "shape": "its shape must be 2 non-negative",
        "attribute": "Attention already has an attribute 'training'",
    }[case]
    with pytest.raises(AttnCallError, match=re.escape(message)):
        attndsl.nn.Attention(*args[0], **args[1])


def _loss(module, q, k, v):
    out, lse = module(q, k, v, return_lse=True)
    return (out * out).sum() + lse.sum()


def _grads(fn, module, qkv):
    module.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    fn(module, *leaves).backward()
    return [t.grad for t in leaves] + [module.rel.grad.clone()]


def test_compiled_fullgraph_module_equals_eager():
    m = _module()
    qkv = _qkv(seed=5)
    eager = _grads(_loss, m, qkv)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, _grads(compiled, m, qkv)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_module_with_inductor_trains():
    m = _module()
    qkv = _qkv(seed=6)
    eager = _grads(_loss, m, qkv)
    compiled = torch.compile(m, fullgraph=True)
    got = _grads(_loss, compiled, qkv)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)


def test_import_attndsl_stays_light_and_attndsl_nn_imports():
    code = ("import sys, attndsl; assert 'torch' not in sys.modules, 'torch loaded'; "
            "import attndsl.nn; print(attndsl.nn.Attention.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "Attention", proc.stderr
