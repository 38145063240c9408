"""The kernel cache: generated modules written atomically under a content-hash key, run from
the verified source text and kept as real files (for tracebacks and Triton's source lookup).

Input: generated Python source and the mode (``compiled`` or ``interpret``). Output: the
module. The key hashes the source, the codegen version, the Triton version, the device
capability and the mode; the file's first line records the hash of its own body, so a corrupt,
truncated or swapped entry is detected and written again. The module is never imported through
importlib: its code is compiled from the text this process generated (the text that is, or is
now, in the file), so no ``__pycache__`` bytecode is written or read, and an altered ``.pyc`` or
a ``.py`` swapped after the check cannot change what runs. The same text is put in ``linecache``
for the file, so ``inspect.getsource`` (Triton's ``@triton.jit``, in compiled and interpreter
mode) reads that text too. The folder is ``$ATTNDSL_CACHE_DIR`` or ``~/.cache/attndsl/kernels``;
when it cannot be created or written (a file, read-only, mkdir fails) the process uses a private
temporary folder instead, with one warning. Triton fixes interpreter or compiled mode when it is
first imported (``TRITON_INTERPRET``), so one process runs one mode: :func:`ensure_mode` sets the
variable when triton is not imported yet and refuses a mode that no longer can be had.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.machinery
import linecache
import os
import shutil
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

CODEGEN_VERSION = "1"
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}
_DIR_LOCK = threading.Lock()
_DIRS: dict[str, Path] = {}         # configured folder -> the folder used (itself or the fallback)
_FALLBACK: list[Path] = []          # the private temporary folder, once made


def configured_dir() -> str:
    """The folder the user asked for: ``$ATTNDSL_CACHE_DIR`` (``~`` expanded) or
    ``~/.cache/attndsl/kernels``, as an absolute path (it may not exist or be usable)."""
    root = os.environ.get("ATTNDSL_CACHE_DIR") or os.path.join("~", ".cache", "attndsl", "kernels")
    root = os.path.expanduser(root)
    try:
        return os.path.abspath(root)
    except OSError:                             # no current folder: the probe reports it
        return root


def _probe(path: Path) -> None:
    """Create ``path`` and write and remove a file in it; raises OSError or ValueError when the
    folder cannot be had or written (a file, read-only, mkdir refused, a NUL in the name)."""
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".probe-")
    os.close(fd)
    os.unlink(tmp)


def _fallback_dir() -> Path:
    """The private temporary folder (mode 0700, removed at exit) of this process."""
    from attndsl.errors import AttnCallError

    if not _FALLBACK:
        try:
            made = Path(tempfile.mkdtemp(prefix="attndsl-kernels-"))
        except OSError as exc:
            raise AttnCallError(f"no usable kernel cache folder: {configured_dir()} is unusable and "
                                f"no temporary folder can be made ({exc}); set ATTNDSL_CACHE_DIR "
                                "to a writable folder") from None
        atexit.register(shutil.rmtree, made, ignore_errors=True)
        _FALLBACK.append(made)
    elif not _FALLBACK[0].is_dir():             # removed under us (a temp cleaner): made again
        try:
            _FALLBACK[0].mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AttnCallError(f"no usable kernel cache folder: {configured_dir()} is unusable "
                                f"and {_FALLBACK[0]} cannot be made again ({exc})") from None
    return _FALLBACK[0]


def _use_fallback(root: str, reason: BaseException) -> Path:
    """Switch the configured folder ``root`` to the fallback, warning once per folder."""
    fallback = _fallback_dir()
    if _DIRS.get(root) != fallback:
        _DIRS[root] = fallback
        warnings.warn(f"attndsl: the kernel cache folder {root} is unusable "
                      f"({type(reason).__name__}: {reason}); this process uses the private "
                      f"temporary folder {fallback} instead (set ATTNDSL_CACHE_DIR to a writable "
                      "folder)", stacklevel=4)
    return fallback


def cache_dir() -> Path:
    """The folder of the cached modules and of ``autotune.json``: the configured folder
    (:func:`configured_dir`, created when missing) when it can be written, else the private
    temporary folder of this process (one warning per unusable folder). Raises AttnCallError
    only when neither can be had."""
    root = configured_dir()
    with _DIR_LOCK:
        used = _DIRS.get(root)
        if used is not None and used.is_dir():
            return used
        try:
            _probe(Path(root))
        except (OSError, ValueError) as exc:
            return _use_fallback(root, exc)
        _DIRS[root] = Path(root)
        return Path(root)


def _unusable(path: Path, reason: BaseException) -> Path:
    """The folder to use after writing into ``path`` failed: the fallback (with a warning)
    when ``path`` is the configured folder; raises AttnCallError when it is the fallback."""
    from attndsl.errors import AttnCallError

    with _DIR_LOCK:
        if _FALLBACK and path == _FALLBACK[0]:
            raise AttnCallError(f"cannot write the kernel cache file in {path}: {reason}") from None
        return _use_fallback(configured_dir(), reason)


def triton_version() -> str:
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
    text = "\0".join([source, CODEGEN_VERSION, triton_version(), device_tag(interpret)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _header(body: str) -> str:
    return f"# attndsl generated module sha256={hashlib.sha256(body.encode()).hexdigest()}\n"


def _valid(path: Path, text: str) -> bool:
    """Whether the file at ``path`` holds exactly ``text`` (header and body)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError, ValueError):
        return False


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


def _run(name: str, path: Path, text: str):
    """A module named ``name`` whose ``__file__`` is ``path``, executed from ``text`` (the
    verified file content) without importlib: no bytecode is read or written. ``text`` is
    registered in ``linecache`` for ``path`` (with no mtime, so ``checkcache`` keeps it): the
    source that ``inspect``/Triton read is the source that runs."""
    code = compile(text, str(path), "exec", dont_inherit=True)
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    module = types.ModuleType(name)
    spec = importlib.machinery.ModuleSpec(name, None, origin=str(path))
    spec.has_location = True
    module.__spec__, module.__file__, module.__cached__ = spec, str(path), None
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_module(body: str, interpret: bool, prefix: str = "attndsl_gen"):
    """The module of ``body`` for the mode: its file in the cache folder is checked (written
    again when missing, corrupt or different) and the module runs from the generated text
    itself. A folder that cannot be written is replaced by the private fallback folder."""
    ensure_mode(interpret)
    return _load(body, module_key(body, interpret), prefix)


def torch_version() -> str:
    import torch

    return torch.__version__


def load_torch_module(body: str, prefix: str = "attndsl_torch"):
    """A generated torch module (codegen/torch_lower.py), cached like the Triton modules; its key
    hashes the source, the codegen version and the torch version (no Triton involved)."""
    text = "\0".join([body, CODEGEN_VERSION, torch_version(), "torch"])
    return _load(body, hashlib.sha256(text.encode()).hexdigest()[:32], prefix)


def _load(body: str, key: str, prefix: str):
    """The module of ``body`` under ``key`` (see :func:`load_module`)."""
    name = f"{prefix}_{key}"
    text = _header(body) + body
    with _LOCK:
        folder = cache_dir()
        path = folder / f"{name}.py"
        if str(path) in _LOADED:
            return _LOADED[str(path)]
        if not _valid(path, text):
            try:
                write_atomically(path, text)
            except OSError as exc:
                folder = _unusable(folder, exc)
                path = folder / f"{name}.py"
                if not _valid(path, text):
                    try:
                        write_atomically(path, text)
                    except OSError as again:
                        _unusable(folder, again)
        module = _run(name, path, text)
        _LOADED[str(path)] = module
        return module


def classifier(interpret: bool):
    """The tile classification kernel module (codegen/classify.py) for the mode, loaded like
    a generated module from the text of its real file."""
    source = (Path(__file__).parent / "classify.py").read_text(encoding="utf-8")
    return load_module(source, interpret, prefix="attndsl_classify")
