"""The .attn grammar (attn.lark) and the prelude (prelude.attn), shipped as package data.

This folder is the package ``attndsl.grammar`` (pyproject.toml maps it), and only that: imported
as ``grammar`` (the repository root on ``sys.path``) it would be a second copy; that import fails.
"""

if __name__ != "attndsl.grammar":
    raise ImportError(f"import attndsl.grammar, not {__name__}: the folder grammar/ is the package "
                      "attndsl.grammar (pyproject.toml's package-dir); under another name it would "
                      "load twice. Install the project (pip install -e .) and import attndsl.grammar",
                      name=__name__)
