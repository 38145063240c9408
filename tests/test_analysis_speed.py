"""The analysis's work, not its wall time (targets in time live in bench/bench_block_map.py).

Pair-by-pair work is counted by ``blockmap.REFINED``: exact descriptors (bands, and residue
pieces at tiles as wide as their gaps) must decide every tile without it, so that the dilated
window's refinement cliff (block_map at 8K spent its time refining tiles it then left as they
were) cannot come back unnoticed. Radial Attention's if-chains (examples/radial.attn) are checked
sound and exact against brute force, and decided without refining whole tiles.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

import attndsl
from attndsl.analysis import blockmap
from attndsl.analysis.api import row_sets
from attndsl.analysis.residues import _max_gap, _max_run, residue_bounds
from attndsl.blocks import block_map_by_tiles

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(file, name, **params):
    return attndsl.load(str(EXAMPLES / file))[name].bind(**params)


def _counted(pattern, n, heads=1, block=(128, 128), kv_len=None):
    attndsl.caches.clear()
    blockmap.REFINED.reset()
    m = pattern.block_map(n, n if kv_len is None else kv_len, heads, block=block)
    return m, blockmap.REFINED.pairs, blockmap.REFINED.sampled


def _brute(pattern, q_len, kv_len, heads, block, **tensors):
    return block_map_by_tiles(pattern.grid(q_len, kv_len, heads, heads, tensors), block)


def _check(ours, brute):
    assert not ((ours == 0) & (brute != 0)).any(), "a tile marked empty holds an allowed pair"
    assert not ((ours == 2) & (brute != 2)).any(), "a tile marked full holds a masked pair"


@pytest.mark.parametrize("n, block", [(8192, (128, 128)), (8000, (128, 64)), (5000, (64, 128)),
                                      (8192, (16, 16))])
def test_dilated_window_is_decided_without_pair_evaluation(n, block):
    """The cliff: dilated(512, 4) at 8K refined ~1000 tiles pair by pair, changing none."""
    pattern = _load("dilated.attn", "dilated_window")
    _m, pairs, sampled = _counted(pattern, n, block=block)
    assert pairs == 0 and sampled == 0


@pytest.mark.parametrize("file, name, params, heads", [
    ("dilated.attn", "dilated_window", {"window": 256, "dilation": 4}, 1),
    ("dilated.attn", "dilated_window", {"window": 33, "dilation": 7}, 1),
    ("dilated.attn", "longnet_segments", {"segment": 512, "r": 4}, 4),
])
def test_residue_patterns_exact_without_refinement(monkeypatch, file, name, params, heads):
    """With refinement off, exact residue descriptors still give the exact map."""
    monkeypatch.setattr(blockmap, "REFINE_PAIRS", 0)
    pattern = _load(file, name, **params)
    for n, kv, block in [(1000, 1000, (128, 128)), (777, 900, (64, 32)), (1536, 1536, (128, 64))]:
        attndsl.caches.clear()
        ours = pattern.block_map(n, kv, heads, block=block)
        assert (ours == _brute(pattern, n, kv, heads, block)).all(), (n, kv, block)


def test_residue_bounds():
    assert _max_gap({0}, 4) == 4 and _max_gap({0, 3}, 8) == 5
    assert _max_run({0}, 4) == 1 and _max_run({0, 3}, 4) == 2 and _max_run({0, 1, 2, 3}, 4) is None
    sets = row_sets(_load("dilated.attn", "dilated_window").bound())
    assert sets.exact
    rb = residue_bounds(sets.upper, (128, 128))
    assert rb.touch_exact and rb.run == 1
    assert not residue_bounds(sets.upper, (128, 2)).touch_exact     # tiles narrower than the gap


RESIDUE_SRC = """
pattern dil(w = 8, d = 3):
    mask = dilated(w, d)
pattern strided_like(s = 8):
    mask = causal and (q - k <= s or (q - k) % s == 0)
pattern fixed_like(s = 8, c = 2):
    mask = causal and (q // s == k // s or k % s >= s - c)
pattern two_classes(a = 3, b = 5):
    mask = (k - q) % a == 0 or (k - q) % b == 1
pattern band_and_residue(m = 4):
    mask = abs(q - k) <= 5 or (k % m != 1 and k < q)
pattern per_head(r = 3):
    mask = causal and ((k - h) % r == 0 or k == q)
"""


def test_residue_maps_sound_and_exact_at_random_sizes(monkeypatch):
    """Random residue patterns, lengths and tile shapes: sound without refinement, exact with."""
    prog = attndsl.compile(RESIDUE_SRC)
    rng = random.Random(12)
    draws = {"dil": lambda: {"w": rng.randint(1, 20), "d": rng.randint(1, 9)},
             "strided_like": lambda: {"s": rng.randint(1, 20)},
             "fixed_like": lambda: {"s": rng.randint(3, 20), "c": rng.randint(1, 2)},
             "two_classes": lambda: {"a": rng.randint(2, 6), "b": rng.randint(2, 7)},
             "band_and_residue": lambda: {"m": rng.randint(2, 7)},
             "per_head": lambda: {"r": rng.randint(1, 5)}}
    for _ in range(60):
        name = rng.choice(sorted(draws))
        pattern = prog[name].bind(**draws[name]())
        q_len, kv_len = rng.randint(1, 120), rng.randint(1, 120)
        block = (rng.randint(1, 24), rng.randint(1, 24))
        heads = 3 if name == "per_head" else 1
        brute = _brute(pattern, q_len, kv_len, heads, block)
        attndsl.caches.clear()
        assert (pattern.block_map(q_len, kv_len, heads, block=block) == brute).all()
        with monkeypatch.context() as mp:
            mp.setattr(blockmap, "REFINE_PAIRS", 0)
            attndsl.caches.clear()
            _check(pattern.block_map(q_len, kv_len, heads, block=block), brute)


@pytest.mark.parametrize("frame, n, block", [(64, 1024, (64, 64)), (16, 700, (32, 16)),
                                             (100, 1200, (128, 128)), (256, 2048, (128, 128))])
def test_radial_sound_and_exact(monkeypatch, frame, n, block):
    pattern = _load("radial.attn", "radial", frame=frame)
    brute = _brute(pattern, n, n, 1, block)
    attndsl.caches.clear()
    assert (pattern.block_map(n, n, 1, block=block) == brute).all()
    monkeypatch.setattr(blockmap, "REFINE_PAIRS", 0)
    attndsl.caches.clear()
    _check(pattern.block_map(n, n, 1, block=block), brute)


def test_radial_is_not_refined_whole():
    """Radial at 4K refined every partial tile pair by pair (11M pairs, seconds); samples now
    prove them partial: no tile is evaluated whole."""
    pattern = _load("radial.attn", "radial")
    m, pairs, sampled = _counted(pattern, 4096)
    assert pairs == 0
    assert 0 < sampled <= int((m == 1).sum()) * blockmap.SAMPLE ** 2
    assert (m == _brute(pattern, 4096, 4096, 1, (128, 128))).all()


def test_radial_mask_shrinks_with_distance():
    """The example means what its comment says (a few pairs, by hand)."""
    pattern = _load("radial.attn", "radial", frame=256)
    q = 256 * 39 + 100                       # position 100 of frame 39
    row = pattern.dense_mask(256 * 40, 256 * 40, rows=(q, q + 1))[0, 0]
    for j, radius in [(38, 256), (36, 128), (33, 64), (31, 32), (20, 16), (2, 8)]:
        keys = np.flatnonzero(row[256 * j:256 * (j + 1)])
        assert len(keys) == min(100 + radius, 256) - max(100 - radius + 1, 0), j
    assert row[:256].all()                   # the sink frame


TABLE_SRC = """
pattern block_table(b = 8, tab: int[][]):
    mask = tab[h, q // b] == k // b or q == k
pattern cell_table(b = 8, sel: int[][][]):
    mask = k <= q and sel[h, q // b, k // b] == 1
"""


def test_multi_dimensional_tables_read_per_tile_are_sound_and_exact(monkeypatch):
    """A 2-D or 3-D table read at indices that are constant on a tile (tiles inside the
    table's blocks) decides each tile without refinement, exactly; at other tile shapes (boxes
    of several entries, or too many) the classes stay sound."""
    prog = attndsl.compile(TABLE_SRC)
    rng = np.random.default_rng(5)
    for trial in range(24):
        heads, n, b = 2, int(rng.integers(20, 90)), int(rng.choice([4, 8, 16]))
        nb = -(-n // b)
        if trial % 2:
            name, tensors = "block_table", {"tab": rng.integers(0, nb, (heads, nb))}
        else:
            name, tensors = "cell_table", {"sel": rng.integers(0, 2, (heads, nb, nb))}
        pattern = prog[name].bind(b=b)
        for block in ((b, b), (b // 2, b // 4 or 1), (3 * b, 2 * b), (5, 7)):
            brute = _brute(pattern, n, n, heads, block, **tensors)
            with monkeypatch.context() as mp:
                mp.setattr(blockmap, "REFINE_PAIRS", 0)
                mp.setattr(blockmap, "SAMPLE_PAIRS", 0)
                attndsl.caches.clear()
                got = pattern.block_map(n, n, heads, block=block, **tensors)
            _check(got, brute)
            if b % block[0] == 0 and b % block[1] == 0 and name == "cell_table":
                assert np.array_equal(got, brute), (name, n, b, block)


def _docs(n, n_docs=7, seed=3):
    """doc[t] and doc_start[d] for documents of random lengths (boundaries not tile-aligned)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_docs - 1, replace=False))
    doc = np.searchsorted(cuts, np.arange(n), side="right").astype(np.int64)
    return doc, np.concatenate([[0], cuts]).astype(np.int64)


@pytest.mark.parametrize("n, block", [(3000, (128, 128)), (2500, (64, 32)), (1000, (50, 70))])
def test_document_relative_keys_solved_exactly(n, block):
    """``doc[q] == doc[k] and k - doc_start[doc[k]] < g``: under the equality the solver reads
    doc[q] for doc[k], so the document's first keys are an interval and no tile is refined."""
    pattern = _load("global_window_docs.attn", "global_window_docs", window=100, n_global=3)
    doc, starts = _docs(n)
    attndsl.caches.clear()
    blockmap.REFINED.reset()
    ours = pattern.block_map(n, n, 1, block=block, doc=doc, doc_start=starts)
    assert blockmap.REFINED.pairs == 0 and blockmap.REFINED.sampled == 0
    assert (ours == _brute(pattern, n, n, 1, block, doc=doc, doc_start=starts)).all()


def test_equal_reads_substitution_keeps_other_tensors_unknown():
    """Only t[k] under ``t[q] == t[k]`` is replaced: a read of another tensor at k stays
    unknown (sound), and the map still agrees with brute force where the solver is exact."""
    src = ("pattern p(a: int[], b: int[]):\n"
           "    mask = a[q] == a[k] and (b[k] == 1 or k - a[k] >= q - 500)\n")
    pattern = attndsl.compile(src)["p"]
    n = 700
    a = (np.arange(n) // 150).astype(np.int64)
    b = (np.arange(n) % 3 == 0).astype(np.int64)
    ours = pattern.block_map(n, n, 1, block=(64, 64), a=a, b=b)
    _check(ours, _brute(pattern, n, n, 1, (64, 64), a=a, b=b))


def test_block_map_with_tensor_runs_does_not_import_numpy_ma():
    """np.unique imports numpy.ma on its first use (~20 ms of a first call): the analysis's
    run detection and tile passes do without it."""
    import subprocess
    import sys
    code = (
        "import sys, numpy as np, attndsl\n"
        "p = attndsl.compile('pattern p(doc: int[]):\\n    mask = causal and doc[q] == doc[k]\\n')['p']\n"
        "doc = (np.arange(1000) // 300).astype(np.int64)\n"
        "assert 'numpy.ma' not in sys.modules\n"
        "p.block_map(1000, 1000, 1, block=(64, 64), doc=doc)\n"
        "print('numpy.ma' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tile_passes_work_per_distinct_range_not_per_row(monkeypatch):
    """The touched/covered sums take one entry per run of rows with the same tile ranges: for
    causal at 32K that is a few per row tile, not one per row."""
    from attndsl.analysis import rows
    seen = []
    real = rows._runs

    def spy(tile_rows, arrays):
        idx, weight = real(tile_rows, arrays)
        seen.append((len(idx), int(weight.sum())))
        return idx, weight
    monkeypatch.setattr(rows, "_runs", spy)
    n = 32768
    attndsl.caches.clear()
    m = _load("causal.attn", "causal_lm").block_map(n, n, 1, block=(128, 128))
    i, j = np.indices(m.shape[1:])
    assert (m[0] == np.where(i == j, 1, np.where(i > j, 2, 0))).all()
    assert seen and all(entries <= 2 * (n // 128) and rows_ == n for entries, rows_ in seen)


def test_merge_and_touch_cover_slots_match_per_row_reference():
    """merge_slots (the two-slot case written out) and touch_and_cover_slots agree with merge
    and a per-row reading of the intervals, on random intervals with empty and adjacent ones."""
    from attndsl.analysis.rows import merge, merge_slots, touch_and_cover_slots
    from attndsl.reference import CallGrid
    rng = np.random.default_rng(5)
    pattern = attndsl.compile("pattern c:\n    mask = causal\n")["c"]
    for kv_len, n_slots, block in ((1000, 2, (16, 64)), (777, 2, (10, 100)), (640, 3, (32, 64))):
        r = 96
        lo = rng.integers(0, kv_len, (2, r, n_slots)).astype(np.int32)
        hi = np.minimum(lo + rng.integers(-40, 300, lo.shape), kv_len - 1).astype(np.int32)
        hi[..., 0] = np.where(rng.random(hi[..., 0].shape) < 0.3, lo[..., -1] - 1, hi[..., 0])
        ml, mh = merge(lo, hi)
        sl, sh = merge_slots([lo[..., j] for j in range(n_slots)], [hi[..., j] for j in range(n_slots)])
        keys = np.arange(kv_len)

        def member(lo_, hi_, keys=keys):
            return ((keys >= lo_[..., None]) & (keys <= hi_[..., None])).any(axis=-2)
        assert (member(ml, mh) == member(np.stack(sl, -1), np.stack(sh, -1))).all()
        grid = CallGrid(pattern.bound().ir, {}, r, kv_len, 2, 2, {})
        rows_ = np.arange(r)
        touched, covered = touch_and_cover_slots(sl, sh, grid, rows_, block)
        allowed = member(ml, mh)                                 # [H, R, kv_len]
        bq, bk = block
        for i in range(-(-r // bq)):
            for j in range(-(-kv_len // bk)):
                t = allowed[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert (touched[:, i, j] == t.any(axis=(1, 2))).all()
                assert (covered[:, i, j] == t.all(axis=(1, 2))).all()
