"""The Triton backend: one call, as the list of its stages.

Input: a :class:`~attndsl.call.BoundCall` (the ``bind`` stage's output, attndsl/runtime.py),
its :class:`~attndsl.call.CallData` and the torch q, k, v. Output: (out [B, H, Lq, Dv] in q's
dtype, lse [B, H, Lq] in the accumulation dtype) as section 6 of the language defines them.

    tune      choose the tile configuration        codegen/autotune.py   Config
    analyse   launches and their tile classes      codegen/plan.py       CallAnalysis
    plan      tile tables, hooks, grids, merge     codegen/plan.py       Plan
    generate  the module of every launch           codegen/emit.py       module source (str)
    compile   written and loaded by content hash   codegen/cache.py      module
    launch    arguments, then the skeleton runs    codegen/kernel.py     Launch -> (out, lse)
    merge     log-sum-exp of gathered launches     codegen/kernel.py     (out, lse)

``ATTNDSL_DUMP=analysis,plan,source,launch`` prints those stages' outputs (attndsl/dump.py).

:func:`backward` gives the call's gradients (dq, dk, dv) from the forward's final (out, lse)
and the gradients of out and lse: it runs the same analyse, plan and generate stages for the
same tile configuration (the module holds the backward kernels too), then the backward's own
stages (codegen/backward.py: transposed tables, launches, reduction of the partials).
"""

from __future__ import annotations

from functools import partial

import torch

from attndsl.call import BoundCall, CallData, acc_dtype
from attndsl.dump import dump

from . import autotune, cache, emit, kernel
from . import backward as bwd
from .config import DEFAULT_CONFIG, Config
from .plan import analyse, plan
from .tables import with_tables


def forward(call: BoundCall, data: CallData, q, k, v, config: Config | None = None):
    """(out, lse) of one call; ``config``: a tile configuration, by default the tuned one."""
    if call.shape.empty:                # nothing to launch: every row is empty (out 0, lse -inf)
        return empty_result(q, v)
    if config is None:
        config = autotune.choose_config(call.pattern, q, k, v,
                                        partial(_runner, call, data, q, k, v), call.interpret)
    launches, finish = prepare(call, data, q, k, v, config)
    return finish([kernel.run(launch, call.interpret) for launch in launches])


def prepare(call: BoundCall, data: CallData, q, k, v, config: Config):
    """The stages up to the launches: (launches, finish), ``finish(results)`` merging them."""
    planned, sources = generate(call, data, q, k, config)
    modules = [cache.load_module(text, call.interpret) for text in sources]
    launches = dump("launch", [
        kernel.bind_launch(lp, module, q, k, v, call.scale, data.tensors, config, call.interpret)
        for lp, module in zip(planned.launches, modules)],
        lambda ls: "\n".join(f"launch {i + 1}: {x.describe()}" for i, x in enumerate(ls)))
    return launches, partial(kernel.finish, dtype=q.dtype)


def generate(call: BoundCall, data: CallData, q, k, config: Config):
    """The stages that need no kernel: analyse, plan and generate; (Plan, the source of every
    launch's module). ``q``, ``k``: the call's tensors (read by the device classifier only)."""
    analysis = dump("analysis", analyse(call, data, config.block), lambda a: a.describe())
    planned = dump("plan", plan(analysis, data, config, q, k), lambda p: "\n".join(p.describe()))
    sources = dump("source", [emit.module_source(lp.pattern) for lp in planned.launches],
                   "\n".join)
    return planned, sources


def _runner(call, data, q, k, v, config: Config):
    """For autotuning: the host work of a configuration done, a function running its kernels."""
    launches, finish = prepare(call, data, q, k, v, config)
    return lambda: finish([kernel.run(launch, call.interpret) for launch in launches])


def empty_result(q, v):
    """(out, lse) of a call with no output row or no key: zeros and -inf."""
    batch, heads, q_len, _ = q.shape
    out = q.new_zeros((batch, heads, q_len, v.shape[-1]))
    return out, torch.full((batch, heads, q_len), -torch.inf, dtype=acc_dtype(q.dtype),
                           device=q.device)


def backward(call: BoundCall, data: CallData, q, k, v, out, lse, dout, dlse=None,
             config: Config | None = None):
    """(dq, dk, dv) of one call, in the dtypes of q, k, v: ``out`` and ``lse`` the forward's
    final results, ``dout`` the gradient of out, ``dlse`` that of lse (None: lse unused).
    ``config``: the tile configuration, by default :data:`codegen.config.DEFAULT_CONFIG` (the
    gradients do not depend on the forward's: they read only its final out and lse)."""
    if call.shape.empty:
        return bwd.zero_grads(q, k, v)
    launches, finish = prepare_backward(call, data, q, k, v, out, lse, dout, dlse,
                                        config or DEFAULT_CONFIG)
    for launch in launches:
        bwd.run(launch)
    return finish()


def prepare_backward(call: BoundCall, data: CallData, q, k, v, out, lse, dout, dlse,
                     config: Config):
    """The backward's stages up to its launches: (launches, finish), ``finish()`` summing the
    partial gradients once the launches have run (codegen/backward.py)."""
    planned, sources = generate(call, data, q, k, config)
    modules = [cache.load_module(text, call.interpret) for text in sources]
    static = data.static and not any(with_tables(lp.pattern)[3] for lp in planned.launches)
    launches, finish = bwd.bind_backward(planned, modules, data, q, k, v, out, lse, dout, dlse,
                                         call.interpret, static)
    dump("launch", launches,
         lambda ls: "\n".join(f"backward launch {i + 1}: {x.describe()}" for i, x in enumerate(ls)))
    return launches, finish
