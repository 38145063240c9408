"""Triton helpers that give generated hooks the language's semantics (LANGUAGE.md section 3).

Triton's integer ``//`` and ``%`` truncate like C; the language floors like Python. Divisors are
compile-time constants greater than 0, which the helpers rely on. ``tanh`` and ``pow`` are
written with exp2/log2 so that they exist on every Triton version and in the interpreter.

Only functions are defined here (no other module-level name): codegen/lower.py copies the
helpers a pattern's hooks call, each function's text as it is, into the generated module.
"""

import triton
import triton.language as tl


@triton.jit
def floormod(a, c):
    r = a % c
    return tl.where(r < 0, r + c, r)


@triton.jit
def floordiv(a, c):
    return (a - floormod(a, c)) // c


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no overflow to NaN; 1.4426950408889634 is
    # log2(e), so exp(2x) = exp2(x * 2 * log2(e))
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def powf(a, b):
    # a ** b as in IEEE pow for the cases the reference meets: negative bases with integral
    # exponents keep their sign, other negative bases give NaN
    mag = tl.exp2(b * tl.log2(tl.abs(a)))
    odd = tl.abs(b - 2.0 * tl.floor(b * 0.5)) == 1.0
    integral = b == tl.floor(b)
    neg = tl.where(odd, -mag, mag)
    out = tl.where(a < 0.0, tl.where(integral, neg, float("nan")), mag)
    return tl.where(b == 0.0, 1.0, out)
