"""The Triton backend: lowering from the checked IR to generated kernels.

This folder is the package ``attndsl.codegen`` (pyproject.toml maps it), and only that: imported
as ``codegen`` (the repository root on ``sys.path``) every module would load a second time, with
caches and jit functions of its own. That import fails here.
"""

if __name__ != "attndsl.codegen":
    raise ImportError(f"import attndsl.codegen, not {__name__}: the folder codegen/ is the package "
                      "attndsl.codegen (pyproject.toml's package-dir); under another name each "
                      "of its modules would load twice, with two sets of caches and jit functions. "
                      "Install the project (pip install -e .) and import attndsl.codegen",
                      name=__name__)
