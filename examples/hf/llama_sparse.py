"""A Hugging Face causal LM whose attention is an attndsl pattern (attention sinks + a window).

    .venv/bin/python examples/hf/llama_sparse.py                  # CPU, a few seconds
    .venv/bin/python examples/hf/llama_sparse.py --device cuda    # generated Triton kernels

A tiny Llama (random weights: the text is noise, the mechanics are real) generates greedily for
a left-padded batch of prompts of different lengths, with a KV cache, through
``attndsl.hf.register``: StreamingLLM's mask (Xiao et al. 2023, arXiv:2309.17453,
examples/streaming_llm.attn) lets each query see the first ``--sinks`` tokens of its own row
and the last ``--window`` ones. First the script checks the hook against transformers' SDPA
with the dense causal pattern (the same logits), then prints what the sparse model generates
and how it differs from dense attention. Needs ``pip install attndsl[hf]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attndsl
import attndsl.hf

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent
PAD = 0


def tiny_llama(device: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device).eval()


def prompts(lengths, device: str, seed: int = 1):
    """Random token ids (3..127), left-padded with PAD, and their 2-D attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, length in enumerate(lengths):
        ids[b, n - length:] = torch.randint(3, 128, (length,), generator=g)
        mask[b, n - length:] = 1
    return ids.to(device), mask.to(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sinks", type=int, default=2)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--lengths", default="24,15,6", help="prompt lengths, comma-separated")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]

    prog = attndsl.load(EXAMPLES / "streaming_llm.attn")
    sparse = prog["streaming_llm"].bind(n_sinks=args.sinks, window=args.window)
    dense = attndsl.compile("pattern dense:\n    mask = causal\n")["dense"]
    attndsl.hf.register("attndsl_streaming", sparse)
    attndsl.hf.register("attndsl_dense", dense)

    model = tiny_llama(args.device)
    ids, mask = prompts(lengths, args.device)
    real = mask.bool()

    # 1. the hook with the dense causal pattern is SDPA (left padding: compare real tokens)
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "attndsl_dense"):
            model.set_attn_implementation(impl)
            outs[impl] = model(input_ids=ids, attention_mask=mask).logits[real]
    err = (outs["sdpa"] - outs["attndsl_dense"]).abs().max().item()
    status = "PASS" if err < 1e-4 else "FAIL"
    print(f"{status} dense causal pattern through attndsl.hf == sdpa: max |logit diff| {err:.1e}")

    # 2. greedy generation with a KV cache, sparse and dense
    runs = {}
    for impl in ("attndsl_streaming", "attndsl_dense"):
        model.set_attn_implementation(impl)
        runs[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=PAD)[:, ids.shape[1]:]
    print(f"\n{sparse}")
    print(f"sinks {args.sinks} + window {args.window}: each query sees at most "
          f"{args.sinks + args.window} of its row's tokens")
    for b, length in enumerate(lengths):
        prompt = ids[b, real[b]].tolist()
        print(f"\nrow {b}: prompt of {length} tokens {prompt}")
        print(f"  streaming -> {runs['attndsl_streaming'][b].tolist()}")
        print(f"  dense     -> {runs['attndsl_dense'][b].tolist()}")
    same = (runs["attndsl_streaming"] == runs["attndsl_dense"]).float().mean().item()
    print(f"\n{same:.0%} of generated tokens agree with dense attention")

    # 3. positions are each row's own: while a row is shorter than sinks + window, every query
    #    sees its whole row, so its tokens are dense attention's (cache slots would shift them)
    for b, length in enumerate(lengths):
        full = max(0, args.sinks + args.window - length + 1)    # tokens made by such queries
        n = min(full, args.new_tokens)
        agree = torch.equal(runs["attndsl_streaming"][b, :n], runs["attndsl_dense"][b, :n])
        if n:
            status = status if agree else "FAIL"
            print(f"{'PASS' if agree else 'FAIL'} row {b} (after {ids.shape[1] - length} padding "
                  f"slots): its first {n} generated tokens are dense attention's")
    for name in ("attndsl_streaming", "attndsl_dense"):
        attndsl.hf.unregister(name)
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
