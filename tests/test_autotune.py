"""Autotuning of the tile configuration (codegen/autotune.py): the machinery on tiny calls with
tiny candidate configurations, tuning forced under Triton's interpreter (natively where a GPU is
present) and a fake timer; every candidate against the reference; the persistent JSON cache."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from attndsl.codegen import autotune, backend
from attndsl.codegen.config import DEFAULT_CONFIG, Config

import attndsl
from attndsl.runtime import bind

CUDA = torch.cuda.is_available()
INTERPRET = not CUDA
DEVICE = "cuda" if CUDA else "cpu"
C = Config
BACKEND = "triton" if CUDA else "triton-interpret"
TINY = [C(16, 16), C(32, 16), C(16, 32), C(32, 32)]
SLIDING = "pattern p(w = 9):\n    mask = causal and (sinks(2) or sliding(w))\n"
DOCS = ("pattern d(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n"
        "    score = score - 0.1 * float(q - k)\n")
DILATED = "pattern x(w = 5, g = 3):\n    mask = dilated(w, g)\n"


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Every test its own cache folder (kernels and autotune.json), tuning on by default."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNDSL_AUTOTUNE", raising=False)
    monkeypatch.delenv("ATTNDSL_AUTOTUNE_BUDGET", raising=False)
    autotune.forget()
    yield
    autotune.forget()


def _pattern(src=SLIDING, **values):
    prog = attndsl.compile(src)
    pat = prog[prog.patterns[0]]
    return pat.bind(**values) if values else pat


def _qkv(q_len=40, kv_len=40, heads=2, kv_heads=1, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, generator=g).to(DEVICE, dtype)
                 for h, n in ((heads, q_len), (kv_heads, kv_len), (kv_heads, kv_len)))


class FakeTimer:
    """Milliseconds by configuration label (default 5), recording what it was asked to time."""

    def __init__(self, ms=None, fail=()):
        self.ms, self.fail, self.seen = dict(ms or {}), set(fail), []

    def __call__(self, config, fn, seconds):
        name = autotune.label(config)
        self.seen.append(name)
        if name in self.fail:
            raise RuntimeError("timer failed")
        return self.ms.get(name, 5.0)


def never(config, fn, seconds):
    raise AssertionError("timed, but the result should have come from the cache")


def _choose(pat, qkv, timer, configs=TINY, given=None, **kwargs):
    q, k, v = qkv
    call, data = bind(pat.bound(), q, k, v, False, 0.25, BACKEND, given or {})
    prepare = partial(backend._runner, call, data, q, k, v)     # every launch of the call
    return autotune.choose_config(call.pattern, q, k, v, prepare, INTERPRET, force=True,
                                  candidates=configs, timer=timer, **kwargs)


def _forward(pat, q, k, v, given, config):
    call, data = bind(pat.bound(), q, k, v, False, 0.25, BACKEND, given)
    return backend.forward(call, data, q, k, v, config=config)


def _stored() -> dict:
    return json.loads(autotune.store_path().read_text())["entries"]


# ------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("src", [SLIDING, DOCS, DILATED], ids=["sliding", "docs+score", "dilated"])
def test_every_candidate_configuration_matches_the_reference(src):
    pat = _pattern(src)
    q, k, v = _qkv(37, 45)                  # q_len < kv_len, ragged for 16 and 32
    given = {"doc": np.sort(np.random.default_rng(1).integers(0, 3, 45))} if "doc" in src else {}
    ref, ref_lse = pat.reference(q.double().cpu().numpy(), k.double().cpu().numpy(),
                                 v.double().cpu().numpy(), scale=0.25, **given)
    for config in TINY:
        out, lse = _forward(pat, q, k, v, given, config)
        out, lse = out.double().cpu().numpy(), lse.double().cpu().numpy()
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), config
        assert np.abs(out - ref).max() <= 2e-5 * (np.abs(ref).max() + 1), config
        fin = np.isfinite(ref_lse)
        assert np.abs(lse[fin] - ref_lse[fin]).max() <= 2e-5 * (np.abs(ref_lse[fin]).max() + 1), config


def test_the_tuned_configuration_serves_the_call_correctly():
    pat, qkv = _pattern(DOCS), _qkv(30, 30)
    given = {"doc": np.repeat([0, 1, 2], 10)}
    config = _choose(pat, qkv, FakeTimer({"32x16 w4 s1": 1.0}), given=given)
    assert config == C(32, 16)
    q, k, v = qkv
    out = _forward(pat, q, k, v, given, config)[0]
    ref = pat.reference(*(x.double().cpu().numpy() for x in qkv), scale=0.25, **given)[0]
    assert np.abs(out.double().cpu().numpy() - ref).max() <= 2e-5 * (np.abs(ref).max() + 1)


# ------------------------------------------------------------------------------ choosing
def test_picks_the_fastest_by_the_timer_and_times_each_candidate_once():
    timer = FakeTimer({"16x32 w4 s1": 1.0, "32x32 w4 s1": 2.0})
    pat, qkv = _pattern(), _qkv()
    assert autotune.lookup(pat.bound(), *qkv, INTERPRET, force=True) is None       # lookup never tunes
    assert _choose(pat, qkv, timer) == C(16, 32)
    assert sorted(timer.seen) == sorted(autotune.label(c) for c in TINY)
    assert _choose(pat, qkv, never) == C(16, 32)          # in memory: no second tuning
    entry = _stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]
    assert entry["config"] == {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}
    assert entry["ms"]["16x32 w4 s1"] == 1.0 and len(entry["ms"]) == 4 and entry["pattern"] == "p"


def test_ties_go_to_the_earlier_candidate():
    assert _choose(_pattern(), _qkv(), FakeTimer()) == TINY[0]


def test_results_are_written_and_read_back_in_a_new_process():
    pat, qkv = _pattern(), _qkv()
    assert _choose(pat, qkv, FakeTimer({"32x16 w4 s1": 0.5})) == C(32, 16)
    path = autotune.store_path()
    assert path.is_file() and not any(p.name.startswith(".tmp-") for p in path.parent.iterdir())
    autotune.forget()                       # as a new process: only the file is left
    assert autotune.lookup(pat.bound(), *qkv, INTERPRET, force=True) == C(32, 16)
    autotune.forget()
    assert _choose(pat, qkv, never) == C(32, 16)
    # the same key from a fresh compile of the same source
    assert _choose(_pattern(), qkv, never) == C(32, 16)


def test_writes_keep_entries_that_another_process_wrote():
    pat, qkv = _pattern(), _qkv()
    _choose(pat, qkv, FakeTimer())
    data = json.loads(autotune.store_path().read_text())
    data["entries"]["someone-else"] = {"config": {"block_m": 64, "block_n": 64, "num_warps": 4,
                                                  "num_stages": 2}}
    autotune.store_path().write_text(json.dumps(data))
    _choose(pat, _qkv(q_len=100), FakeTimer())             # another key, tuned and written
    assert {"someone-else", autotune.tuning_key(pat.bound(), *qkv, INTERPRET),
            autotune.tuning_key(pat.bound(), *_qkv(q_len=100), INTERPRET)} <= set(_stored())


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": 99, "entries": {}}', "\udcff"],
                         ids=["syntax", "list", "format", "bytes"])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(text):
    path = autotune.store_path()
    if text == "\udcff":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    pat, qkv = _pattern(), _qkv()
    timer = FakeTimer({"32x32 w4 s1": 1.0})
    assert _choose(pat, qkv, timer) == C(32, 32) and timer.seen
    assert autotune.config_of(_stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]) == C(32, 32)


@pytest.mark.parametrize("config", [{"block_m": "16"}, {"block_m": 16, "block_n": 16, "num_warps": 4},
                                    {"block_m": 0, "block_n": 16, "num_warps": 4, "num_stages": 1},
                                    None])
def test_a_malformed_entry_is_tuned_again(config):
    pat, qkv = _pattern(), _qkv()
    key = autotune.tuning_key(pat.bound(), *qkv, INTERPRET)
    autotune.store_path().write_text(json.dumps({"format": 1, "entries": {key: {"config": config}}}))
    timer = FakeTimer({"16x16 w4 s1": 9.0})
    assert _choose(pat, qkv, timer) == C(32, 16) and len(timer.seen) == 4


def test_a_failing_candidate_is_skipped():
    # a 24-row tile does not compile (Triton's ranges are powers of two); a failing timing too
    timer = FakeTimer({"24x16 w4 s1": 0.1, "16x16 w4 s1": 3.0, "32x32 w4 s1": 0.2},
                      fail={"32x32 w4 s1"})
    pat, qkv = _pattern(), _qkv()
    assert _choose(pat, qkv, timer, [C(24, 16), C(16, 16), C(32, 32)]) == C(16, 16)
    entry = _stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]
    assert set(entry["ms"]) == {"16x16 w4 s1"}
    assert "power of 2" in entry["skipped"]["24x16 w4 s1"]
    assert "timer failed" in entry["skipped"]["32x32 w4 s1"]
    assert "24x16 w4 s1" not in timer.seen


def test_all_candidates_failing_is_a_clear_error():
    pat, qkv = _pattern(), _qkv()
    with pytest.raises(attndsl.AttnCallError, match="none of the 2 tile configurations ran.*24x16"):
        _choose(pat, qkv, FakeTimer(), [C(24, 16), C(16, 48)])
    assert not autotune.store_path().exists()


def test_a_candidate_whose_output_disagrees_is_skipped(monkeypatch):
    prepare = backend._runner

    def wrong_for_32x32(*args):
        fn = prepare(*args)
        if args[-1] != C(32, 32):
            return fn

        def run():
            out, lse = fn()
            return out + 0.5, lse
        return run

    monkeypatch.setattr(backend, "_runner", wrong_for_32x32)
    timer = FakeTimer({"32x32 w4 s1": 0.1, "32x16 w4 s1": 1.0})
    pat, qkv = _pattern(), _qkv()
    with pytest.warns(RuntimeWarning, match="32x32 w4 s1 output disagrees with 16x16 w4 s1"):
        assert _choose(pat, qkv, timer) == C(32, 16)
    entry = _stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]
    assert "disagrees with 16x16 w4 s1: out differs" in entry["skipped"]["32x32 w4 s1"]


def test_every_launch_of_a_call_is_timed(monkeypatch):
    # backend.prepare(...) -> (launches, finish): every launch of a call (gathered components)
    seen = []
    real = backend.prepare

    def prepare(call, data, q, k, v, config):
        seen.append(config)
        (first,), _ = real(call, data, q, k, v, config)
        (again,), _ = real(call, data, q, k, v, config)
        return [first, again], lambda results: (results[0][0] + 0.5 * (config.block_m == 32),
                                                results[1][1])

    monkeypatch.setattr(backend, "prepare", prepare)
    timer = FakeTimer({"32x32 w4 s1": 0.1, "16x32 w4 s1": 1.0})
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert _choose(_pattern(), _qkv(), timer) == C(16, 32)    # 32-row tiles disagree
    assert seen == TINY


def test_disagreement_rules():
    out = torch.randn(1, 2, 8, 4)
    lse = torch.randn(1, 2, 8)
    lse[0, 1, 3] = -torch.inf
    assert autotune.disagreement((out, lse), (out + 1e-5, lse), torch.float32) is None
    assert autotune.disagreement((out, lse), (out + 1e-2, lse), torch.float32) is not None
    assert autotune.disagreement((out, lse), (out + 1e-2, lse), torch.bfloat16) is None
    other = lse.clone()
    other[0, 0, 0] = -torch.inf
    assert "non-finite" in autotune.disagreement((out, lse), (out, other), torch.float32)
    bad = out.clone()
    bad[0, 0, 0, 0] = torch.nan
    assert "non-finite" in autotune.disagreement((out, lse), (bad, lse), torch.float32)
    assert autotune.disagreement((bad, lse), (bad.clone(), lse), torch.float32) is None
    plus = lse.clone()
    plus[0, 1, 3] = torch.inf
    assert "non-finite" in autotune.disagreement((out, lse), (out, plus), torch.float32)


def test_the_deadline_stops_trying_once_one_candidate_is_timed():
    timer = FakeTimer()
    pat, qkv = _pattern(), _qkv()
    assert _choose(pat, qkv, timer, budget_s=1e-9) == TINY[0]
    assert timer.seen == ["16x16 w4 s1"]
    skipped = _stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]["skipped"]
    assert set(skipped) == {autotune.label(c) for c in TINY[1:]}


def test_the_default_timer_measures_something(monkeypatch):
    monkeypatch.setattr(autotune, "DEADLINE_FACTOR", 1e6)      # first calls may be slow here
    pat, qkv = _pattern(), _qkv()
    config = _choose(pat, qkv, None, TINY[:2], budget_s=0.05)
    ms = _stored()[autotune.tuning_key(pat.bound(), *qkv, INTERPRET)]["ms"]
    assert config in TINY[:2] and len(ms) == 2 and all(t > 0 for t in ms.values())
    assert ms[autotune.label(config)] == min(ms.values())


# --------------------------------------------------------------------------- when to tune
def test_autotune_off_gives_the_default_configuration(monkeypatch):
    monkeypatch.setenv("ATTNDSL_AUTOTUNE", "0")
    pat, qkv = _pattern(), _qkv()
    assert _choose(pat, qkv, never) == DEFAULT_CONFIG
    assert autotune.lookup(pat.bound(), *qkv, INTERPRET) == DEFAULT_CONFIG
    assert not autotune.store_path().exists()
    monkeypatch.setenv("ATTNDSL_AUTOTUNE", "maybe")
    with pytest.raises(attndsl.AttnCallError, match="ATTNDSL_AUTOTUNE must be 0"):
        _choose(pat, qkv, never)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_budget_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("ATTNDSL_AUTOTUNE_BUDGET", value)
    with pytest.raises(attndsl.AttnCallError, match="ATTNDSL_AUTOTUNE_BUDGET"):
        _choose(_pattern(), _qkv(), never)


def test_the_interpreter_and_the_cpu_are_not_tuned_unless_forced():
    pat = _pattern()
    q, k, v = (x.cpu() for x in _qkv())
    for interpret in (True, False):
        assert autotune.choose_config(pat.bound(), q, k, v, lambda config: never, interpret,
                                      candidates=TINY, timer=never) == DEFAULT_CONFIG
        assert autotune.lookup(pat.bound(), q, k, v, interpret) == DEFAULT_CONFIG
    assert not autotune.store_path().exists()


def test_empty_calls_are_not_tuned():
    assert _choose(_pattern(), _qkv(q_len=0), never) == DEFAULT_CONFIG


# ----------------------------------------------------------------------------------- keys
def test_the_key_follows_buckets_dtype_shapes_and_parameter_values():
    pat = _pattern()

    def key(p=pat, **kw):
        return autotune.tuning_key(p.bound(), *_qkv(**kw), INTERPRET)

    base = key()
    assert key(q_len=33, kv_len=64) == base == key(p=_pattern(w=9))   # one bucket, same values
    assert key(seed=3) == base
    for other in (key(q_len=65), key(kv_len=31), key(heads=4), key(kv_heads=2), key(d=32),
                  key(dtype=torch.bfloat16), key(p=_pattern(w=10)), key(p=_pattern(DOCS))):
        assert other != base
    assert len({key(q_len=65), key(kv_len=31), key(heads=4), key(dtype=torch.bfloat16),
                key(p=_pattern(w=10))}) == 5
    assert autotune.bucket(0) == autotune.bucket(1) == 1 and autotune.bucket(1025) == 2048
    assert "arch=interpret" in key() if INTERPRET else "arch=sm" in key()


# ----------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("q_len,d,dv,dtype,cap,smem_kib", [
    (8192, 128, 128, torch.bfloat16, (9, 0), 227), (8192, 128, 128, torch.float32, (8, 0), 163),
    (8192, 256, 256, torch.bfloat16, (8, 6), 99), (1, 64, 64, torch.float16, (7, 5), 64),
    (100, 96, 64, torch.bfloat16, (8, 9), 99), (8192, 128, 128, torch.float32, (7, 0), 96)])
def test_candidates_fit_the_shared_memory_and_start_with_the_prior(q_len, d, dv, dtype, cap, smem_kib):
    limit = smem_kib * 1024
    found = autotune.candidates(q_len, 8192, d, dv, dtype, cap, limit)
    elem = torch.empty((), dtype=dtype).element_size()
    assert 2 <= len(found) <= autotune.MAX_CANDIDATES + 1 and len(set(found)) == len(found)
    assert found[-1] == DEFAULT_CONFIG
    for c in found[:-1]:
        assert autotune.shared_memory_estimate(c, d, dv, elem) <= limit, c
        assert c.block_m >= 16 and c.block_n >= 32 and (cap >= (8, 0) or c.num_stages <= 2)
        assert c.block_m <= max(16, autotune.bucket(q_len))
    shapes = [c.block for c in found[:-1]]
    assert len(set(shapes[:3])) == min(3, len(set(shapes)))      # tile shapes first


def test_candidates_prefer_large_half_precision_tiles_and_prune_wide_heads():
    big = autotune.candidates(8192, 8192, 128, 128, torch.bfloat16, (9, 0), 227 * 1024)
    assert big[0] == C(128, 64, 8, 3)
    narrow = autotune.candidates(8192, 8192, 256, 256, torch.bfloat16, (8, 6), 99 * 1024)
    assert all(c.block_m <= 64 for c in narrow)
    tiny = autotune.candidates(8192, 8192, 128, 128, torch.bfloat16, (9, 0), 1024)
    assert tiny == [DEFAULT_CONFIG]
