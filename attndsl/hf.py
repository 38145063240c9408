"""A Hugging Face transformers attention hook: run a model's attention through an attndsl pattern.

    import attndsl, attndsl.hf
    pat = attndsl.load("examples/streaming_llm.attn")["streaming_llm"].bind(n_sinks=4, window=256)
    attndsl.hf.register("streaming", pat)
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="streaming")
    # or: model.set_attn_implementation("streaming")

:func:`register` puts two functions under one name: an attention function in transformers'
``AttentionInterface`` and a mask function in its ``AttentionMaskInterface``. transformers
builds no mask for an implementation it does not know, so without the second the attention
function would never learn which tokens are padding.

The mask function (:func:`padding_mask`) gives the padding and nothing else: a bool tensor
``[batch, 1, 1, L]``, true at the key slots that hold a token, where ``L`` is the number of
slots written so far (queries included). With a static cache ``L`` is the true key length, not
the cache's capacity. Causality, windows, chunks, prefixes: all of it comes from the pattern,
so a prefix-LM pattern stays bidirectional over its prefix.

The attention function (:func:`attention`) takes the module's q ``[B, H, Lq, D]`` and k, v
``[B, KVH, Lk, D]`` as transformers passes them (K/V unrepeated: attndsl takes ``kv_heads``
itself), keeps the first ``L`` key slots (the rest of a static cache was never written), and
returns ``[B, Lq, H, Dv]`` and no attention weights. Its invariants:

* The queries are the last ``Lq`` of the ``L`` slots, so the contract's bottom-right alignment
  is right with a KV cache: one decoding query is the newest token.
* The pattern's ``q`` and ``k`` are token positions: the ordinal of a token among its row's
  real tokens, never a cache slot. A batch without padding runs as one call. A row with padding
  (left, right or holes) runs on its own with its padding slots cut out of the keys and the
  queries, so positions start at 0 in every row; the output rows of padding queries are 0.
  Every pattern, whatever its positions mean (sinks, globals, prefixes, chunks, documents),
  sees each row exactly as if it had come alone, unpadded.
* Gradients flow (``pat(q, k, v)`` is differentiable; the row cuts are indexing); dtypes are
  the model's (float16, bfloat16, float32, float64).

What the hook cannot honour raises :class:`~attndsl.AttnCallError` instead of running
something else: a cache that keeps only its last keys (a sliding-window cache layer: the key
positions would be unknown), attention dropout, ``softcap`` and learned sink logits
(``s_aux``; write them in the pattern), a 4-D mask prepared for another implementation, and
packed sequences (``position_ids`` restarting inside a row).

transformers is an optional extra (``pip install attndsl[hf]``); ``import attndsl`` does not
import this module, and importing it without transformers raises an ImportError saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:      # the optional extra is missing
    raise ImportError("attndsl.hf needs Hugging Face transformers: pip install attndsl[hf] "
                      f"(importing it failed: {exc})") from exc

from .errors import AttnCallError
from .inputs import short_repr
from .program import Pattern
from .runtime import BACKENDS

__all__ = ["register", "unregister", "registered", "attention", "padding_mask"]


@dataclass(frozen=True)
class Hook:
    """What :func:`register` stored under one name: the pattern, its call's backend (None:
    attndsl's default for the tensors' device) and the tensor inputs given to every call."""

    name: str
    pattern: Pattern
    backend: str | None
    inputs: dict


_HOOKS: dict[str, Hook] = {}


def _builtin_names() -> set:
    """transformers' own implementation names, which register() must not replace."""
    ours = set(_HOOKS)
    return {"eager", *AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping} \
        - ours


def register(name: str, pat: Pattern, *, backend: str | None = None, **tensor_inputs) -> str:
    """Register ``pat`` as the attention implementation ``name`` of transformers (attention
    and padding-mask functions, module docstring); returns ``name``, so
    ``from_pretrained(..., attn_implementation=attndsl.hf.register("x", pat))`` reads in one.

    ``backend`` goes to every call (``pat(q, k, v, backend=...)``); ``tensor_inputs`` are the
    pattern's tensor inputs, given once for every layer and call: indexed by token position
    (as the pattern sees positions), with an optional leading batch dimension of the model's
    batch size. Registering a name again replaces its pattern; transformers' own names
    ("sdpa", "eager", "flash_attention_2", ...) are refused."""
    if not isinstance(name, str) or not name or name.startswith("paged|"):
        raise AttnCallError(f"attndsl.hf.register(): the name must be a non-empty str (not "
                            f"'paged|...'), got {short_repr(name)}")
    if name in _builtin_names():
        raise AttnCallError(f"attndsl.hf.register(): '{name}' is an attention implementation of "
                            "transformers itself; register the pattern under a name of its own")
    if not isinstance(pat, Pattern):
        raise AttnCallError("attndsl.hf.register(): the pattern must be an attndsl.Pattern "
                            f"(prog['name'].bind(...)), got {type(pat).__name__}")
    pat.bound()                 # every scalar parameter has a value (else a clear error)
    if backend is not None and backend not in BACKENDS:
        raise AttnCallError(f"attndsl.hf.register(): backend must be one of "
                            f"{', '.join(map(repr, BACKENDS))} or None, got {short_repr(backend)}")
    declared = set(pat.tensor_params)
    unknown = sorted(set(tensor_inputs) - declared)
    if unknown:
        raise AttnCallError(f"attndsl.hf.register(): pattern '{pat.name}' has no tensor input "
                            f"'{unknown[0]}' (its tensor inputs: "
                            f"{', '.join(sorted(declared)) or 'none'})")
    missing = sorted(declared - set(tensor_inputs))
    if missing:
        raise AttnCallError(f"attndsl.hf.register(): pattern '{pat.name}' needs its tensor input "
                            f"'{missing[0]}'; pass it: register({name!r}, pat, {missing[0]}=...)")
    hook = Hook(name, pat, backend, dict(tensor_inputs))
    _HOOKS[name] = hook

    def attention_function(module, query, key, value, attention_mask, dropout=0.0,
                           scaling=None, **kwargs):
        return attention(hook, module, query, key, value, attention_mask, dropout, scaling,
                         **kwargs)

    attention_function.__name__ = f"attndsl_{name}"
    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def unregister(name: str) -> None:
    """Remove a name registered by :func:`register` from both of transformers' interfaces."""
    if name not in _HOOKS:
        raise AttnCallError(f"attndsl.hf.unregister(): no attndsl pattern is registered as "
                            f"{short_repr(name)} (registered: {', '.join(_HOOKS) or 'none'})")
    del _HOOKS[name]
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def registered() -> dict:
    """name -> Pattern of every name registered by :func:`register`."""
    return {name: hook.pattern for name, hook in _HOOKS.items()}


# ----------------------------------------------------------------------------- the mask function
def padding_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None,
                 q_offset=0, kv_offset=0, attention_mask=None, device=None, cache_position=None,
                 **_ignored):
    """The mask function registered under a hook's name: bool ``[batch, 1, 1, L]``, true at the
    key slots holding a token (``attention_mask``'s 2-D padding), ``L = q_offset + q_length``
    the slots written so far (the cache's true length, not a static cache's capacity).

    Called by transformers' ``create_causal_mask`` and its kin with keyword arguments; the
    ``mask_function`` they pass (causal, sliding, ...) is ignored: the pattern is the mask.
    transformers before 5 passes ``cache_position`` (the queries' slots) instead of
    ``q_length`` and ``q_offset``."""
    if q_length is None:
        if cache_position is None:
            raise AttnCallError("the attndsl mask function got neither q_length nor "
                                "cache_position from transformers")
        q_length = int(cache_position.shape[0])
        q_offset = cache_position[0] if q_length else 0
    q_offset, kv_offset = int(q_offset), int(kv_offset)   # a static cache gives a tensor
    if kv_offset != 0:
        raise AttnCallError(f"the cache keeps only its last keys (key slots start at position "
                            f"{kv_offset}: a sliding-window cache layer), so the pattern's key "
                            "positions are unknown; use a cache with every key (a model config "
                            "without sliding_window or layer_types, or DynamicCache() without "
                            "config)")
    length = q_offset + q_length
    if device is None:
        device = attention_mask.device if isinstance(attention_mask, torch.Tensor) else "cpu"
    if attention_mask is None:
        keep = torch.ones((batch_size, length), dtype=torch.bool, device=device)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        keep = attention_mask.to(device=device, dtype=torch.bool)[:, :length]
        if keep.shape[1] < length:      # slots without an entry are padding, as transformers has it
            keep = torch.nn.functional.pad(keep, (0, length - keep.shape[1]), value=False)
        keep = keep.expand(batch_size, length)
    else:
        raise AttnCallError("the attndsl mask function takes a 2-D attention_mask [batch, keys], "
                            f"got {_describe(attention_mask)}")
    return keep.reshape(batch_size, 1, 1, length).contiguous()


# ----------------------------------------------------------------------------- the attention
def _describe(mask) -> str:
    if isinstance(mask, torch.Tensor):
        return f"a {mask.dtype} tensor of shape {list(mask.shape)}"
    return type(mask).__name__


def _key_padding(mask, batch: int, q_len: int, k_len: int, name: str):
    """(keep [B, L] bool or None for no padding, L) from the mask the attention function got."""
    if mask is None:            # a model that builds no mask: every key slot is a token
        return None, k_len
    ok = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 4 \
        and mask.shape[1] == mask.shape[2] == 1 and mask.shape[0] in (1, batch)
    if not ok:
        raise AttnCallError(f"the attndsl attention '{name}' takes the padding mask of its own "
                            "mask function (bool [batch, 1, 1, keys]), got "
                            f"{_describe(mask)}: a mask prepared for another implementation "
                            "holds causality, which the pattern supplies; pass the model a 2-D "
                            "attention_mask")
    length = int(mask.shape[-1])
    if not q_len <= length <= k_len:
        raise AttnCallError(f"the attndsl attention '{name}': the padding mask covers {length} "
                            f"key slots, but the call has {q_len} queries and {k_len} keys")
    keep = mask[:, 0, 0, :].expand(batch, length)
    return (None if bool(keep.all()) else keep), length


def _check_packing(position_ids, keep, q_len: int, length: int, name: str) -> None:
    """Packed sequences (several documents in a row, ``position_ids`` restarting) would need
    per-document positions, which the hook does not build: refuse them."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or q_len < 2 \
            or position_ids.shape[-1] != q_len:
        return
    steps = position_ids.diff(dim=-1) == 1           # [B or 1, Lq - 1]
    if keep is not None:        # only between real query tokens next to each other
        real = keep[:, length - q_len:]
        steps = steps | ~(real[:, 1:] & real[:, :-1])
    if not bool(steps.all()):
        raise AttnCallError(f"the attndsl attention '{name}': position_ids restart inside a row "
                            "(packed sequences); the hook runs one sequence per row: pad the "
                            "batch and pass an attention_mask")


def _row_inputs(hook: Hook, b: int | None, device) -> dict:
    """The hook's tensor inputs for the whole batch (b None) or batch row b, on ``device``."""
    out = {}
    for pname, t in hook.inputs.items():
        if isinstance(t, torch.Tensor):
            t = t.to(device)
        rank = hook.pattern.ir.param(pname).type.rank
        if b is not None and getattr(t, "ndim", None) == rank + 1 and t.shape[0] > 1:
            t = t[b:b + 1]                  # a batch dimension: row b's own
        out[pname] = t
    return out


def attention(hook: Hook, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              **kwargs):
    """The attention function of a registered hook (module docstring): (out [B, Lq, H, Dv],
    None)."""
    name = hook.name
    if dropout:
        raise AttnCallError(f"the attndsl attention '{name}' runs no attention dropout, got "
                            f"dropout={dropout!r}; set the model config's attention_dropout to 0")
    for arg, what in (("softcap", "a logit soft-cap"), ("s_aux", "learned sink logits")):
        if kwargs.get(arg) is not None:
            raise AttnCallError(f"the attndsl attention '{name}' got {arg}= ({what}): write it "
                                "in the pattern's score clause instead")
    batch, _, q_len, _ = query.shape
    keep, length = _key_padding(attention_mask, batch, q_len, key.shape[2], name)
    _check_packing(kwargs.get("position_ids"), keep, q_len, length, name)
    key, value = key[:, :, :length], value[:, :, :length]
    call = dict(scale=scaling, backend=hook.backend)
    if keep is None:
        out = hook.pattern(query, key, value, **call, **_row_inputs(hook, None, query.device))
    else:
        out = torch.cat([_padded_row(hook, b, query, key, value, keep[b], call)
                         for b in range(batch)])
    return out.transpose(1, 2).contiguous(), None


def _padded_row(hook: Hook, b: int, query, key, value, keep, call: dict):
    """Batch row b alone, its padding slots cut out of the keys and the queries (so the pattern
    sees token positions from 0); [1, H, Lq, Dv] with zeros at the padding queries."""
    q_len, length = query.shape[2], keep.shape[0]
    q_keep = keep[length - q_len:]
    out_shape = (1, query.shape[1], q_len, value.shape[-1])
    if not bool(q_keep.any()):
        return query.new_zeros(out_shape)
    keys = keep.nonzero().squeeze(1)
    queries = q_keep.nonzero().squeeze(1)
    row = hook.pattern(query[b:b + 1].index_select(2, queries),
                       key[b:b + 1].index_select(2, keys), value[b:b + 1].index_select(2, keys),
                       **call, **_row_inputs(hook, b, query.device))
    return query.new_zeros(out_shape).index_copy(2, queries, row)
