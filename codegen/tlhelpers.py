"""Triton helpers that give generated hooks the language's semantics (LANGUAGE.md section 3).

Triton's integer ``//`` and ``%`` truncate like C; the language floors like Python. Divisors are
compile-time constants greater than 0, which the helpers rely on. ``tanh`` and ``pow`` are
written with exp2/log2 so that they exist on every Triton version and in the interpreter.

The integer helpers below compute in int64 whatever their operands' width (the int32 hooks
narrow the result again: codegen/lower.py). Their inputs at the pairs a mask evaluates are
checked by the runtime before any kernel runs (shift counts in 0..62, floor/ceil/round of a
finite value within int64); a kernel evaluates every pair of a tile, so at the others they
clamp what LLVM would make poison (a shift by 64 or more, a float beyond int64 converted to
int), which an ``&`` with a false condition would not clear.

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


@triton.jit
def shl(a, c):
    # a << c, wrapping in int64 like the reference
    return tl.cast(a, tl.int64) << tl.minimum(tl.maximum(c, 0), 63)


@triton.jit
def shr(a, c):
    # a >> c, arithmetic (Triton shifts signed ints arithmetically)
    return tl.cast(a, tl.int64) >> tl.minimum(tl.maximum(c, 0), 63)


@triton.jit
def ilog2(n):
    # floor(log2(n)) for n >= 1, -1 for n <= 0, exact: a binary search for the highest set bit
    # (shifts by 32, 16, 8, 4, 2, 1; what is left of x is then 1, or 0 when n <= 0)
    x = tl.maximum(tl.cast(n, tl.int64), 0)
    r = tl.cast(tl.where(x > 0, 0, -1), tl.int64)
    for i in tl.static_range(6):
        t = x >> (32 >> i)
        r = tl.where(t > 0, r + (32 >> i), r)
        x = tl.where(t > 0, t, x)
    return r


@triton.jit
def round_even(x):
    # the integral float nearest x, ties to even (Python's round); exact in float64: x - f is
    # exact for |x| < 2**52 and 0 beyond, where every float is an integer
    f = tl.floor(x)
    d = x - f
    odd = f - 2.0 * tl.floor(f * 0.5) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def to_int64(y):
    # an integral float64 in int64; NaN and values beyond int64 (at pairs the mask discards)
    # become 0
    ok = (y >= -9223372036854775808.0) & (y < 9223372036854775808.0)
    return tl.cast(tl.where(ok, y, 0.0), tl.int64)
