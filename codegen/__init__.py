"""The Triton backend: lowering from the checked IR to generated kernels (filled by a later issue)."""
