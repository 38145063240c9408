"""The kernel cache: generated modules written atomically under a content-hash key and imported
from real files.

Input: generated Python source and the mode (``compiled`` or ``interpret``). Output: the
imported module. The key hashes the source, the codegen version, the Triton version, the device
capability and the mode; the file's first line records the hash of its own body, so a corrupt or
truncated entry is detected and written again. The directory is ``$ATTNDSL_CACHE_DIR`` or
``~/.cache/attndsl/kernels``. Triton fixes interpreter or compiled mode when it is first
imported (``TRITON_INTERPRET``), so one process runs one mode: :func:`ensure_mode` sets the
variable when triton is not imported yet and refuses a mode that no longer can be had.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

CODEGEN_VERSION = "1"
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("ATTNDSL_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "attndsl", "kernels")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _triton_version() -> str:
    import triton

    return triton.__version__


def device_tag(interpret: bool) -> str:
    if interpret:
        return "interpret"
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return "cpu"


def module_key(source: str, interpret: bool) -> str:
    text = "\0".join([source, CODEGEN_VERSION, _triton_version(), device_tag(interpret)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _header(body: str) -> str:
    return f"# attndsl generated module sha256={hashlib.sha256(body.encode()).hexdigest()}\n"


def _valid(path: Path, body: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text == _header(body) + body


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader sees the old file or the whole new one, never a part (also used by codegen/autotune.py)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_mode(interpret: bool) -> None:
    """Triton fixes interpreter or compiled mode when it is first imported: check or set it."""
    from attndsl.errors import AttnCallError

    wanted = "1" if interpret else None
    if "triton" not in sys.modules:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        return
    current = os.environ.get("TRITON_INTERPRET") or None
    if (current in ("1", "true", "True")) != (wanted is not None):
        need = "set" if interpret else "unset"
        raise AttnCallError(f"backend {'triton-interpret' if interpret else 'triton'} needs "
                            f"TRITON_INTERPRET {need} before triton is first imported in this "
                            "process (Triton fixes the mode at import)")


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_module(body: str, interpret: bool, prefix: str = "attndsl_gen"):
    """The module of ``body`` for the mode, from the cache (written first when missing)."""
    ensure_mode(interpret)
    key = module_key(body, interpret)
    name = f"{prefix}_{key}"
    with _LOCK:
        path = cache_dir() / f"{name}.py"
        if str(path) in _LOADED:
            return _LOADED[str(path)]
        if not _valid(path, body):
            write_atomically(path, _header(body) + body)
        module = _import(name, path)
        _LOADED[str(path)] = module
        return module


def skeleton(interpret: bool):
    """The kernel skeleton module for the mode (its own copy per mode, from its real file)."""
    source = (Path(__file__).parent / "skeleton.py").read_text(encoding="utf-8")
    return load_module(source, interpret, prefix="attndsl_skeleton")


def classifier(interpret: bool):
    """The tile classification kernel module (codegen/classify.py) for the mode, loaded like
    the skeleton from its real file."""
    source = (Path(__file__).parent / "classify.py").read_text(encoding="utf-8")
    return load_module(source, interpret, prefix="attndsl_classify")
