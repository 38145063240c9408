"""attndsl: a compiler for attention patterns.

    import attndsl
    prog = attndsl.load("examples/longformer.attn")
    pat = prog["longformer"].bind(w=512)
    out = pat(q, k, v)
"""

from . import caches
from .errors import AttnCallError, AttnError, AttnNameError, AttnSyntaxError, AttnTypeError
from .program import Pattern, Program, compile, load

__version__ = "0.1.0"

__all__ = ["AttnError", "AttnSyntaxError", "AttnNameError", "AttnTypeError", "AttnCallError",
           "Pattern", "Program", "caches", "compile", "load", "__version__"]
