"""``attndsl bench``: time each pattern of a file against dense attention at one call's sizes.

Input: the parsed command line (sizes, dtype, device, backend, ``--set``, ``--input``, the
number of timed calls, ``--backward``, ``--baseline``). Output: per pattern, the median time of
the pattern's call (forward, or forward and backward) next to torch's dense
``scaled_dot_product_attention`` on the same q, k, v (bottom-right causal, or with no mask),
and their ratio; exit status 1 when a pattern could not run. Values are not checked here
(``attndsl run`` validates against the reference); q, k, v are random Gaussian from
``--seed``; tensor inputs come from ``--input`` or demo values, as for ``run``. Timings are
wall-clock medians after one warm-up call, with the device synchronised around each call.
"""

from __future__ import annotations

from .cli_common import (
    call_arguments,
    common_arguments,
    load_inputs,
    random_call,
    report,
    select_patterns,
    timed,
)
from .errors import AttnError
from .program import load


def add_parser(sub) -> None:
    """Register ``bench`` on the subcommand parsers of :func:`attndsl.cli.build_parser`."""
    p = sub.add_parser("bench", help="time patterns against dense attention",
                       description="Time each pattern's call (median of --repeat calls after a "
                                   "warm-up) next to torch's dense scaled_dot_product_attention "
                                   "on the same inputs. Values are not checked: use 'attndsl "
                                   "run' for that.")
    common_arguments(p, 4096, "query heads (default 4)")
    call_arguments(p, 5, "timed calls after one warm-up call")
    p.add_argument("--backward", action="store_true",
                   help="time forward and backward (the gradient of out.sum())")
    p.add_argument("--baseline", choices=("causal", "full"), default="causal",
                   help="the dense baseline: SDPA with is_causal (bottom-right aligned, "
                        "default) or without a mask")
    p.set_defaults(func=cmd_bench, heads=None)


def cmd_bench(args) -> int:
    prog = load(args.file)
    given = load_inputs(args)
    status = 0
    for pat in select_patterns(prog, args):
        try:
            bench_one(pat, args, given)
        except AttnError as err:
            report(err)
            status = 1
    return status


def _dense(q, k, v, causal: bool):
    """torch's dense attention on the call's q, k, v (GQA: k and v repeated per group;
    ``causal``: bottom-right aligned, the contract's causal)."""
    import torch
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = None
    if causal:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        rows = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bench_one(pat, args, given: dict) -> None:
    """Time one pattern and the dense baseline; print the report lines."""
    import torch

    call = random_call(pat, args, given)
    b, heads, kv_heads, q_len, kv_len, d = call.sizes
    q, k, v, inputs, backend, sync = call.q, call.k, call.v, call.inputs, call.backend, call.sync
    device = q.device
    tensors = {n: torch.as_tensor(a, device=device) for n, a in inputs.values.items()}
    causal = args.baseline == "causal"

    def run(fn):
        if not args.backward:
            with torch.no_grad():
                return timed(lambda: fn(q, k, v), args.repeat, sync)[1]
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        return timed(lambda: fn(*leaves).sum().backward(), args.repeat, sync)[1]

    ms = run(lambda q_, k_, v_: pat(q_, k_, v_, backend=backend, **tensors))
    dense_ms = run(lambda q_, k_, v_: _dense(q_, k_, v_, causal))
    what = "forward and backward" if args.backward else "forward"
    print(f"{pat.name}: {backend} on {device}, {args.dtype}, q {[b, heads, q_len, d]}, "
          f"k and v {[b, kv_heads, kv_len, d]}, {what}, median of {args.repeat}")
    for line in inputs.notes:
        print(f"  {line}")
    print(f"  attndsl {ms:.2f} ms, dense {args.baseline} SDPA {dense_ms:.2f} ms: "
          f"{ms / dense_ms:.2f}x its time" if dense_ms > 0 else f"  attndsl {ms:.2f} ms")
