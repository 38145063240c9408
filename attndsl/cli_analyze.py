"""``attndsl analyze``: the block-sparsity analysis of each pattern as a table or JSON.

For each pattern: density and kept pairs, attention FLOPs against dense, the work a
block-sparse kernel does and the fraction of it that is masked out, the tile classes, the
kind of key descriptor (band / residue), the kernel's launches at the tile shape (plain tiles or
residue-class gathers, band or list tables), the closed form and asymptotic class of the kept
pairs, the receptive-field depth over stacked layers and warnings (rows with no key).
"""

from __future__ import annotations

import json
import time

import numpy as np

from .cli_common import (
    call_inputs,
    common_arguments,
    count,
    load_inputs,
    require_bound,
    select_patterns,
)
from .errors import AttnCallError
from .inputs import check_lengths
from .reference import head_dependent


def add_parser(sub) -> None:
    """Register ``analyze`` on the subcommand parsers of :func:`attndsl.cli.build_parser`."""
    p = sub.add_parser("analyze", help="block sparsity, cost and graph properties of patterns",
                       description="Analyse each pattern at the given sizes: density, kept pairs, "
                                   "FLOPs against dense attention, wasted work in non-empty "
                                   "tiles, closed form of the kept pairs, receptive-field "
                                   "depth over stacked layers and warnings.")
    common_arguments(p, 4096, "query heads (default 1, or 8 when the mask depends on the head)")
    p.add_argument("--block", type=count(1), default=128, metavar="B",
                   help="tile size BxB of the block map (default 128)")
    p.add_argument("--head-dim", type=count(1), default=128, metavar="D",
                   help="head dimension for the FLOP counts (default 128)")
    p.add_argument("--graph-tokens", type=count(1), default=2048, metavar="N",
                   help="largest length for the exact token-level receptive-field analysis "
                        "(default 2048); longer calls use the tile graph, which gives a lower "
                        "bound on the depth")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_analyze)


def analyze_one(pat, args, given=None) -> dict:
    """The report of one pattern (``given``: the ``--input`` values; demo values for the rest)."""
    from .analysis.cost import cost_report
    from .analysis.graph import graph_report

    q_len = args.q_len
    kv_len = q_len if args.kv_len is None else args.kv_len
    heads = args.heads or (8 if head_dependent(pat.ir.mask) else 1)
    kv_heads = args.kv_heads or heads
    check_lengths(q_len, kv_len, heads, kv_heads)
    if pat.uses_selectors():
        raise AttnCallError(f"pattern '{pat.name}' selects blocks from the query and key vectors "
                            "at run time; analyze describes static patterns")
    rng = np.random.default_rng(args.seed)
    tensors, _, notes = call_inputs(pat, given or {}, (q_len, kv_len, heads, kv_heads), 16, rng)
    block = (args.block, args.block)
    t0 = time.perf_counter()
    desc = pat.describe(q_len, kv_len, heads, block, kv_heads, **tensors)
    seconds = time.perf_counter() - t0
    cost = cost_report(pat, q_len, kv_len, heads, block, args.head_dim, kv_heads, **tensors)
    graph = graph_report(pat, q_len, kv_len, heads, block=block, max_tokens=args.graph_tokens,
                         **tensors)
    from .codegen.plan import strategy

    launches = strategy(pat, q_len, kv_len, heads, kv_heads, block, tensors)
    counts = np.bincount(desc.block_map.ravel(), minlength=3)
    kinds = sorted({k.kind if k is not None else "tiles" for k in desc.keys})
    return {
        "pattern": pat.name, "params": pat.params, "q_len": q_len, "kv_len": kv_len,
        "heads": heads, "kv_heads": kv_heads, "block": list(block), "notes": notes,
        "analysis_ms": round(1e3 * seconds, 3),
        "tiles": {"full": int(counts[2]), "partial": int(counts[1]), "empty": int(counts[0])},
        "descriptor": kinds, "head_classes": len(desc.keys), "kernel": launches,
        "cost": cost.as_dict(), "graph": graph.as_dict(),
        "warnings": _warnings(pat, heads, graph),
    }


def _warnings(pat, heads: int, graph) -> list[str]:
    out = []
    for r in graph.empty_rows:
        if r.count or r.unknown:
            what = f"{r.count} query rows" + (f" (and {r.unknown} undecided)" if r.unknown else "")
            out.append(f"pattern '{pat.name}': {what} of head {r.head} have no allowed key at "
                       "the analysed sizes: their output is 0 and lse -inf")
    return out


def _fmt_int(n) -> str:
    n = int(n)
    for unit, size in (("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _launch_text(x: dict) -> str:
    """One launch of the kernel plan (codegen.plan.strategy) in words."""
    if x["kind"] == "gather":
        what = (f"gather: {x['groups']} residue group{'s' if x['groups'] > 1 else ''}, "
                f"queries every {x['step_q']}, keys every {x['step_k']}"
                + (f" in runs of {x['run']}" if x["run"] > 1 else ""))
    else:
        what = "tiles"
    return f"{what} ({x['tables']} tables, {_fmt_int(x['tiles'])} tiles, {_fmt_int(x['full'])} full)"


def reach_text(reach: dict | None, q_len: int, kv_len: int) -> str:
    """The 'reach depth' line: the layers until every target pair is reached, and the share
    reached after each number of layers. The targets are the pairs with k <= q ('causal': no
    allowed key is later than its query) or every pair ('bidirectional'). On the tile graph
    (method 'tiles') the depth is a lower bound and the shares are upper bounds; 'never' is
    exact either way."""
    if not reach:
        return "-" + (" (needs q_len == kv_len > 0)" if q_len != kv_len or not q_len else "")
    causal = reach["direction"] == "causal"
    tiles = reach["method"] == "tiles"
    depth = reach.get("full_reach_depth")
    if depth is None:
        text = ("never: some query never reaches some earlier key" if causal else
                "never: some query never reaches some key (earlier or later)")
    else:
        text = f"{'at least ' if tiles else ''}{depth} layer{'s' if depth != 1 else ''}"
    target = "causal pairs (k <= q)" if causal else \
        "all pairs (bidirectional: some allowed key is later than its query)"
    fr = ", ".join(f"L={n}: {f:.2f}" for n, f in zip(reach["layers"], reach["fractions"]))
    text += f"; {target} reached {'at most ' if tiles else ''}{fr}"
    if tiles:
        text += (f" (tile graph of {reach['tile']}-token tiles: depth a lower bound, shares "
                 "upper bounds)")
    return text


def asymptotic_text(c: dict, q_len: int, kv_len: int) -> str:
    """The asymptotic class of the kept pairs: from the closed form, or, when there is none,
    labelled as a two-point estimate (the kept pairs at N and 2N, N = max(q_len, kv_len))."""
    text = c.get("asymptotic") or "-"
    if c.get("asymptotic") and c.get("asymptotic_estimated"):
        n = max(q_len, kv_len)
        text += (f"  (a two-point estimate from the kept pairs at N={n} and N={2 * n}; no closed "
                 "form: not a proof of the growth)")
    return text


def table_lines(r: dict) -> list[str]:
    c, g = r["cost"], r["graph"]
    depth_text = reach_text(g.get("reach"), r["q_len"], r["kv_len"])
    rows = [
        ("sizes", f"q_len {r['q_len']}, kv_len {r['kv_len']}, heads {r['heads']} "
                  f"(kv {r['kv_heads']}), tiles {r['block'][0]}x{r['block'][1]}"),
        ("density", f"{c['density']:.4g}"),
        ("kept pairs", f"{_fmt_int(c['kept_pairs'])} of {_fmt_int(c['total_pairs'])}"
                       + ("" if c.get("exact", True) else " (upper bound)")),
        ("FLOPs vs dense", f"{_fmt_int(c['flops'])} vs {_fmt_int(c['dense_flops'])} "
                           f"({c['flops'] / max(c['dense_flops'], 1):.3g}x)"),
        ("tiles", f"{r['tiles']['full']} full, {r['tiles']['partial']} partial, "
                  f"{r['tiles']['empty']} empty ({r['head_classes']} head class"
                  f"{'es' if r['head_classes'] > 1 else ''})"),
        ("wasted work", f"{100 * c['wasted_fraction']:.1f}% of {_fmt_int(c['computed_pairs'])} "
                        "pairs in non-empty tiles are masked"),
        ("descriptor", ", ".join(r["descriptor"])),
        ("closed form", (c.get("closed_form") or "-")
         + (f"  (for {c['closed_form_condition']})" if c.get("closed_form_condition") else "")),
        ("asymptotic", asymptotic_text(c, r["q_len"], r["kv_len"])),
        ("reach depth", depth_text),
        ("kernel", "; ".join(_launch_text(x) for x in r["kernel"]) or "-"),
        ("analysis", f"{r['analysis_ms']:.1f} ms"),
    ]
    if g.get("union_covers_causal") is not None:
        rows.append(("heads' union", "covers the causal triangle" if g["union_covers_causal"]
                     else "does NOT cover the causal triangle"))
    width = max(len(k) for k, _ in rows)
    out = [f"{r['pattern']}({', '.join(f'{k}={v}' for k, v in r['params'].items())})"]
    out += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    out += [f"  note: {n}" for n in list(r["notes"]) + list(g.get("notes") or [])]
    out += [f"  warning: {w}" for w in r["warnings"]]
    return out


def cmd_analyze(args) -> int:
    from .program import load

    prog = load(args.file)
    results = []
    pats = select_patterns(prog, args)
    given = load_inputs(args)
    for pat in pats:
        require_bound(pat)
        results.append(analyze_one(pat, args, given))
    if args.json:
        print(json.dumps(results, indent=2, default=_json_default))
    else:
        for i, r in enumerate(results):
            if i:
                print()
            print("\n".join(table_lines(r)))
    return 0


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
