"""Pictures, reports and demo inputs for the command-line tool (no I/O except the PNG writer).

* :func:`group_heads` puts heads with identical masks into one panel, :func:`format_heads`
  names such a group (``heads 0-3``, ``heads 0, 2, 5-7``).
* :func:`mask_cells` (one character per query/key pair: ``█`` allowed, ``·`` masked),
  :func:`mask_half` (two query rows per character with half blocks) and :func:`block_cells`
  (one character per tile: ``█`` full, ``▒`` partial, ``·`` empty) turn arrays into text lines;
  :func:`frame` and :func:`hstack` lay panels out.
* :func:`tiles_from_mask` classifies tiles from a dense mask (selector patterns, whose block maps
  depend on the call's query and key vectors); :func:`density_bounds` bounds the density from
  a block map when the dense mask is too large to build.
* :func:`demo_inputs` makes reproducible values for a pattern's tensor inputs (documents,
  segments, route centroids, random tables of the shape the pattern's indices need).
* :func:`write_png` draws the same panels as a matplotlib heat map (Agg backend).
"""

from __future__ import annotations

import re

import numpy as np

from .errors import AttnCallError
from .ir import Op, Type
from .reference import row_chunks

ALLOWED, MASKED = "█", "·"
HALF = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}
TILE = {0: MASKED, 1: "▒", 2: "█"}
TILE_LEGEND = "█ full tile  ▒ partial tile  · empty tile"
CELL_LEGEND = "█ allowed  · masked"
ROUTE_CLUSTERS = 4           # centroids per head of a demo route() tensor
ID_NAME = re.compile(r"^(docs?|documents?|seg\w*)(_?ids?)?$", re.IGNORECASE)
HALF_LEGEND = "█ ▀ ▄ allowed (two query rows per line), blank masked"


# ----------------------------------------------------------------------------- heads


def format_heads(heads) -> str:
    """``head 3``, ``heads 0-3`` or ``heads 0, 2, 5-7`` for a sorted list of head indices."""
    heads = [int(h) for h in heads]
    if len(heads) == 1:
        return f"head {heads[0]}"
    runs: list[list[int]] = []
    for h in heads:
        if runs and h == runs[-1][-1] + 1:
            runs[-1].append(h)
        else:
            runs.append([h])
    parts = [f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    return "heads " + ", ".join(parts)


def group_heads(per_head: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """Groups of heads with identical arrays, in order of first appearance: [(heads, array)]."""
    groups: list[tuple[list[int], np.ndarray]] = []
    for h in range(per_head.shape[0]):
        for heads, arr in groups:
            if np.array_equal(arr, per_head[h]):
                heads.append(h)
                break
        else:
            groups.append(([h], per_head[h]))
    return groups


# ----------------------------------------------------------------------------- text pictures


def mask_cells(mask: np.ndarray) -> list[str]:
    """One line per query row, one character per key: ``█`` allowed, ``·`` masked."""
    return ["".join(ALLOWED if x else MASKED for x in row) for row in np.asarray(mask, bool)]


def mask_half(mask: np.ndarray) -> list[str]:
    """Two query rows per line with the half blocks ``▀ ▄ █`` (blank: both masked)."""
    mask = np.asarray(mask, bool)
    if mask.shape[0] % 2:
        mask = np.vstack([mask, np.zeros((1, mask.shape[1]), bool)])
    return ["".join(HALF[(bool(a), bool(b))] for a, b in zip(top, bottom, strict=True))
            for top, bottom in zip(mask[0::2], mask[1::2], strict=True)]


def block_cells(bmap: np.ndarray) -> list[str]:
    """One line per query tile, one character per key tile: ``█`` full, ``▒`` partial, ``·``."""
    return ["".join(TILE[int(x)] for x in row) for row in np.asarray(bmap)]


def choose_view(q_len: int, kv_len: int, max_rows: int, max_cols: int) -> str:
    """``cells`` for small masks, ``half`` when two rows per line fit, else ``blocks``."""
    if kv_len <= max_cols and q_len <= max_rows // 2:
        return "cells"
    if kv_len <= max_cols and (q_len + 1) // 2 <= max_rows:
        return "half"
    return "blocks"


def fit_block(q_len: int, kv_len: int, block: int, max_rows: int, max_cols: int) -> int:
    """The smallest ``block * 2**n`` whose tile map fits in max_rows x max_cols."""
    while -(-q_len // block) > max_rows or -(-kv_len // block) > max_cols:
        block *= 2
    return block


def frame(lines: list[str], title: str = "") -> list[str]:
    """The lines in a box, with an optional title line above it."""
    width = max((len(s) for s in lines), default=0)
    body = [f"│{s.ljust(width)}│" for s in lines]
    box = [f"┌{'─' * width}┐", *body, f"└{'─' * width}┘"]
    return ([title] if title else []) + box


def hstack(panels: list[list[str]], gap: int = 2) -> list[str]:
    """Panels (lists of lines) side by side, each padded to its own width."""
    widths = [max((len(s) for s in p), default=0) for p in panels]
    height = max((len(p) for p in panels), default=0)
    out = []
    for r in range(height):
        cells = [(p[r] if r < len(p) else "").ljust(w) for p, w in zip(panels, widths, strict=True)]
        out.append((" " * gap).join(cells).rstrip())
    return out


def layout(panels: list[list[str]], max_cols: int, gap: int = 2) -> list[str]:
    """Panels side by side while they fit in max_cols, wrapping onto further rows of panels."""
    rows: list[list[list[str]]] = [[]]
    used = 0
    for p in panels:
        w = max((len(s) for s in p), default=0)
        if rows[-1] and used + gap + w > max_cols:
            rows.append([])
            used = 0
        used += (gap if rows[-1] else 0) + w
        rows[-1].append(p)
    out: list[str] = []
    for i, row in enumerate(rows):
        if i:
            out.append("")
        out.extend(hstack(row, gap))
    return out


# ----------------------------------------------------------------------------- tiles and density


def tiles_from_mask(mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """int8 [heads, ceil(Lq/bq), ceil(Lk/bk)] from a dense mask: 0 empty, 1 partial, 2 full."""
    heads, lq, lk = mask.shape
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    pad = ((0, 0), (0, nqb * bq - lq), (0, nkb * bk - lk))
    shape = (heads, nqb, bq, nkb, bk)
    has = np.pad(mask, pad, constant_values=False).reshape(shape).any(axis=(2, 4))
    every = np.pad(mask, pad, constant_values=True).reshape(shape).all(axis=(2, 4))
    return np.where(every, 2, np.where(has, 1, 0)).astype(np.int8)


def tile_areas(q_len: int, kv_len: int, bq: int, bk: int) -> np.ndarray:
    """[nqb, nkb] number of in-bounds pairs of each tile (edge tiles are smaller)."""
    rows = np.minimum(bq, q_len - np.arange(0, q_len, bq))
    cols = np.minimum(bk, kv_len - np.arange(0, kv_len, bk))
    return np.outer(rows, cols)


def density_bounds(bmap: np.ndarray, q_len: int, kv_len: int, bq: int, bk: int):
    """(low, high) bounds on the density: full tiles only, and full plus partial tiles."""
    total = bmap.shape[0] * q_len * kv_len
    if total == 0:
        return 0.0, 0.0
    area = tile_areas(q_len, kv_len, bq, bk)[None]
    return float((area * (bmap == 2)).sum() / total), float((area * (bmap > 0)).sum() / total)


def density_text(allowed: int, total: int) -> str:
    """``density 0.273 (286720 of 1048576 pairs)``."""
    frac = allowed / total if total else 0.0
    return f"density {frac:.3f} ({allowed} of {total} pairs)"


# ----------------------------------------------------------------------------- run reports


def signature(pat) -> str:
    """``name(w=256, doc: int[])``: the bound values and the tensor inputs of a pattern."""
    parts = [f"{k}={v!r}" for k, v in pat.values.items()]
    parts += [f"{p.name}: {p.type}" for p in pat.ir.params if p.is_tensor]
    return f"{pat.name}({', '.join(parts)})"


def span(n: int) -> str:
    """``0..n-1``, or ``(none)`` for 0."""
    return f"0..{n - 1}" if n else "(none)"


def fmt_err(x: float) -> str:
    """An error magnitude: ``2.1e-07``, ``0`` or ``nan``."""
    return "0" if x == 0 else f"{x:.1e}"


def verdict_line(ok: bool, name: str, err: float, tol: float, density, backend: str,
                 ms: float) -> str:
    """``PASS longformer: max |err| 2.1e-07 (tolerance 2.0e-05), density 0.273, torch 12.3 ms``."""
    dens = "n/a" if density is None else f"{density:.3f}"
    return (f"{'PASS' if ok else 'FAIL'} {name}: max |err| {fmt_err(err)} (tolerance "
            f"{fmt_err(tol)}), density {dens}, {backend} {ms:.1f} ms")


# ----------------------------------------------------------------------------- demo inputs


class _Probe:
    """Stands in for a tensor input of unknown shape; records the largest index used."""

    BIG = 1 << 40

    def __init__(self, ttype):
        self.ndim = ttype.rank
        self.shape = (self.BIG,) * ttype.rank
        self.size = self.BIG ** ttype.rank
        self.dtype = np.dtype({Type.INT: np.int64, Type.BOOL: np.bool_}.get(ttype.elem, np.float64))
        self.top = [-1] * ttype.rank

    def __getitem__(self, index):
        for axis, i in enumerate(index):
            if np.size(i):
                self.top[axis] = max(self.top[axis], int(np.max(i)))
        return np.zeros(np.broadcast_shapes(*(np.shape(i) for i in index)), self.dtype)


def _probe_shapes(pat, names, known, sizes, query, key) -> dict:
    """The smallest shape of each named tensor input that covers the indices the pattern uses."""
    q_len, kv_len, heads, kv_heads = sizes
    probes = {n: _Probe(pat.ir.param(n).type) for n in names}
    grid = pat.grid(q_len, kv_len, heads, kv_heads, {**known, **probes}, query, key)
    hs, cols = np.arange(heads), np.arange(kv_len)
    try:
        for rows in row_chunks(q_len, kv_len, heads):
            grid.mask(hs, rows, cols)
            grid.score(hs, rows, cols, np.zeros((heads, len(rows), kv_len)))
    except AttnCallError as err:    # a negative index, or one past a tensor already filled
        where = (f" (query positions start at kv_len - q_len = {kv_len - q_len} when q_len > "
                 "kv_len)" if q_len > kv_len else "")
        raise AttnCallError(f"no demo values of the tensor inputs fit these sizes{where}: "
                            f"{err.message.replace(f' of size {_Probe.BIG}', '')}", err.span,
                            err.source) from None
    return {n: tuple(max(1, t + 1) for t in p.top) for n, p in probes.items()}


def _index_deps(pat, names) -> dict:
    """For each named tensor input, the other tensor inputs read inside its indices
    (``rel[h, bucket[q - k]]``: rel depends on bucket), so that those are filled first."""
    deps: dict = {n: set() for n in names}
    for root in pat.ir.roots():
        for node in root.walk():
            if node.op is Op.INDEX and node.value in deps:
                deps[node.value] |= {m.value for a in node.args for m in a.walk()
                                     if m.op is Op.INDEX and m.value != node.value}
    return deps


def _documents(rng, n: int) -> np.ndarray:
    """Document ids 0, 0, ..., 1, 1, ... of random lengths in [n/8, n/3] covering n positions."""
    lo, hi = max(1, n // 8), max(1, n // 3)
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(lo, hi + 1)))
    if lengths:
        lengths[-1] -= sum(lengths) - n
    return np.repeat(np.arange(len(lengths)), lengths)


def _labels(pat, name: str) -> list[int]:
    """The int constants that ``name[...]`` is compared with (``segment[k] == 0``), sorted."""
    found = set()
    for root in pat.ir.roots():
        for node in root.walk():
            if node.op in (Op.EQ, Op.NE):
                a, b = node.args
                for x, y in ((a, b), (b, a)):
                    if x.op is Op.INDEX and x.value == name and y.op is Op.CONST:
                        found.add(int(y.value))
    return sorted(found)


def _segments(rng, n: int, labels: list[int]) -> np.ndarray:
    """Contiguous runs labelled labels[0], labels[1], ... with random cut points."""
    lo, hi = (n // 4, 3 * n // 4 + 1) if n >= 4 * len(labels) else (1, n)
    cuts = np.sort(rng.choice(np.arange(lo, hi), size=len(labels) - 1, replace=False)) \
        if hi - lo >= len(labels) - 1 else np.arange(1, len(labels))
    bounds = np.concatenate([[0], np.minimum(cuts, n), [n]])
    return np.repeat(np.asarray(labels), np.diff(bounds))


def _id_tensors(pat, names, shapes, kv_len, rng, out, notes) -> list[str]:
    """Fill the int[] inputs named like doc*/seg*; returns the names of document tensors."""
    docs = []
    for n in names:
        size = max(kv_len, shapes[n][0])
        labels = _labels(pat, n)
        if len(labels) >= 2:
            out[n] = _segments(rng, size, labels)
            lengths = [int((out[n] == v).sum()) for v in labels]
            notes.append(f"{n}: {len(labels)} segments labelled {', '.join(map(str, labels))} "
                         f"(the values the pattern tests), lengths {', '.join(map(str, lengths))}")
            continue
        out[n] = _documents(rng, size)
        docs.append(n)
        lengths = np.bincount(out[n]).tolist()
        shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
        notes.append(f"{n}: {len(lengths)} random documents covering {size} positions, "
                     f"lengths {shown}")
    return docs


def demo_inputs(pat, sizes, head_dim: int, rng, query=None, key=None, given=None):
    """Demo values for the tensor inputs of a pattern, and lines saying what they are.

    ``sizes`` is (q_len, kv_len, heads, kv_heads). ``route`` centroids are Gaussian
    ``[heads, 4, head_dim]``; an ``int[]`` named like doc/document/seg* holds random documents
    covering the keys (or, when the pattern compares it with constants, contiguous segments with
    those labels), one named like ``*start*`` the documents' first positions; every other input
    gets random values of the smallest shape covering the indices the pattern uses (ints in
    ``[0, kv_len)``, floats Gaussian, bools true one time in eight). The shapes come from
    evaluating the pattern with probes.

    ``given`` (name -> array of the declared rank, checked; the CLI's ``--input``): those
    inputs keep their values, and the others are made knowing them (the ``*start*`` table of a
    given document-id tensor, a table shaped for the indices a given tensor holds); the result
    holds them too. Given values that do not fit the sizes are an AttnCallError naming them.
    """
    q_len, kv_len, heads, _ = sizes
    given = dict(given or {})
    declared = {p.name: p.type for p in pat.ir.params if p.is_tensor}
    if not declared:
        return {}, []
    out, notes = dict(given), []
    for r in pat.ir.roots():
        for node in r.walk():
            if node.op is Op.ROUTE and node.value not in out:
                out[node.value] = rng.standard_normal((heads, ROUTE_CLUSTERS, head_dim))
                notes.append(f"{node.value}: random Gaussian route centroids "
                             f"[{heads}, {ROUTE_CLUSTERS}, {head_dim}]")
    rest = [n for n in declared if n not in out]
    try:
        _fill(pat, declared, rest, given, sizes, rng, out, notes, query, key)
    except AttnCallError as err:
        if not given:
            raise
        names, detail = ", ".join(given), err.message
        if detail.startswith("no demo values"):      # _probe_shapes' own preamble
            detail = detail.split(": ", 1)[-1]
        raise AttnCallError(f"the given tensor input{'s' if len(given) > 1 else ''} {names} "
                            f"and demo values of the others do not fit q_len {q_len}, kv_len "
                            f"{kv_len}, heads {heads}: {detail}", err.span,
                            err.source) from None
    return out, notes


def _fill(pat, declared: dict, rest: list, given: dict, sizes, rng, out: dict, notes: list,
          query, key) -> None:
    """The demo values of the inputs ``rest`` into ``out`` (see :func:`demo_inputs`)."""
    kv_len = sizes[1]
    shapes = _probe_shapes(pat, rest, out, sizes, query, key) if rest else {}
    int1 = [n for n in declared if declared[n].elem is Type.INT and declared[n].rank == 1]
    ids = [n for n in int1 if ID_NAME.match(n)]
    docs = [n for n in ids if n in given and len(_labels(pat, n)) < 2]
    docs += _id_tensors(pat, [n for n in ids if n in rest], shapes, kv_len, rng, out, notes)
    for n in (n for n in int1 if docs and "start" in n.lower() and n not in out):
        starts = np.flatnonzero(np.diff(out[docs[0]], prepend=-1))
        out[n] = np.pad(starts, (0, max(0, shapes[n][0] - len(starts))), constant_values=kv_len)
        notes.append(f"{n}: the first position of each document of {docs[0]}")
    rest[:] = [n for n in rest if n not in out]
    if rest and (given or any(n in out for n in int1)):   # their values may index the others
        shapes = _probe_shapes(pat, rest, out, sizes, query, key)
    deps = _index_deps(pat, rest)
    while rest:
        # an input read inside another's index is filled first, and the others' shapes probed
        # again with its values (a t5-style rel[h, bucket[...]]); a cycle fills what is left
        ready = [n for n in rest if not deps[n] & set(rest)] or rest
        for n in ready:
            _random_input(n, shapes[n], declared[n], kv_len, rng, out, notes)
        rest[:] = [n for n in rest if n not in out]
        if rest:
            shapes = _probe_shapes(pat, rest, out, sizes, query, key)


def _random_input(n: str, shape, t, kv_len: int, rng, out: dict, notes: list) -> None:
    """Random values of ``shape`` for tensor input ``n`` (ints in [0, kv_len), floats
    Gaussian, bools true one time in eight) into ``out``, with a note; too large a shape is an
    AttnCallError."""
    if int(np.prod(shape)) > 1 << 26:
        raise AttnCallError(f"cannot make demo values for tensor input '{n}': its indices "
                            f"need shape {list(shape)}; use smaller sizes")
    if t.elem is Type.INT:
        out[n] = rng.integers(0, max(1, kv_len), shape)
        notes.append(f"{n}: random ints in [0, {max(1, kv_len)}) of shape {list(shape)}")
    elif t.elem is Type.BOOL:
        out[n] = rng.random(shape) < 0.125
        notes.append(f"{n}: random bools (true with probability 1/8) of shape {list(shape)}")
    else:
        out[n] = rng.standard_normal(shape)
        notes.append(f"{n}: random Gaussian {t} of shape {list(shape)}")


# ----------------------------------------------------------------------------- PNG


TILE_COLOURS = ["#f4f4f4", "#f0a030", "#2060b0"]     # empty, partial, full


def write_png(path, figures: list[tuple[str, list[tuple[str, np.ndarray, str]]]]) -> None:
    """One row of subplots per figure ``(title, [(label, 2-D array, kind)])``, saved to path.

    ``kind`` is ``"mask"`` (bool, allowed drawn dark) or ``"blocks"`` (0/1/2 tile classes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    nrows = max(1, len(figures))
    ncols = max([len(panels) for _, panels in figures] + [1])
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    tiles_cmap = ListedColormap(TILE_COLOURS)
    for r, (title, panels) in enumerate(figures):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            label, arr, kind = panels[c]
            if kind == "mask":
                ax.imshow(np.asarray(arr, float), cmap="Greys", vmin=0, vmax=1,
                          interpolation="nearest", aspect="auto")
            else:
                ax.imshow(arr, cmap=tiles_cmap, vmin=0, vmax=2, interpolation="nearest",
                          aspect="auto")
            ax.set_title(f"{title}\n{label}" if c == 0 else label, fontsize=8)
            ax.set_xlabel("key tile" if kind == "blocks" else "key j", fontsize=7)
            ax.set_ylabel("query tile" if kind == "blocks" else "query i", fontsize=7)
            ax.tick_params(labelsize=6)
    from matplotlib.patches import Patch

    if any(kind == "blocks" for _, panels in figures for _, _, kind in panels):
        fig.legend(handles=[Patch(color=c, label=n) for c, n in
                            zip(TILE_COLOURS, ("empty tile", "partial tile", "full tile"))],
                   loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
