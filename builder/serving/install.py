"""Find a ``tritonserver`` and prepare what it needs to run on this machine.

Two installs are supported:

- ``tritonserver`` on PATH (a GPU host, the NGC container): run as it is.
- the binary inside the ``nvidia-pytriton`` wheel (a CPU-only machine). The wheel keeps its
  Python-backend stubs aside, one per Python version, so a writable copy of its server tree is made
  once in a cache folder, with the stub for the running Python in ``backends/python/``.

>>> install = prepare_server_tree(find_tritonserver())
>>> env = server_environment(install)
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

STUB_NAME = "triton_python_backend_stub"
_READY_MARK = ".glm-build-ready"  # written last into a prepared tree: its presence means complete

INSTALL_HINT = (
    "install one with `pip install nvidia-pytriton` (ships a CPU-capable tritonserver), "
    "or run inside NVIDIA's Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3)"
)


class ServerNotFoundError(RuntimeError):
    """No usable ``tritonserver`` binary here."""


@dataclass(frozen=True)
class ServerInstall:
    """Where a ``tritonserver`` lives and what it needs to run.

    >>> find_tritonserver().source
    'wheel'
    """

    binary: Path  # the tritonserver executable
    source: str  # "path" (GPU host / NGC container) or "wheel" (nvidia-pytriton)
    version: str = ""  # nvidia-pytriton's version for the wheel, "" for PATH
    backend_dir: Optional[Path] = None  # --backend-directory; None: the binary's own default
    caches_dir: Optional[Path] = None  # --cache-directory (response-cache plugins); None: default
    library_dirs: tuple[Path, ...] = ()  # go first on LD_LIBRARY_PATH

    @property
    def has_python_stub(self) -> bool:
        """Whether the Python backend can start models (assumed for a PATH install)."""
        return self.backend_dir is None or (self.backend_dir / "python" / STUB_NAME).is_file()


def find_tritonserver() -> ServerInstall:
    """``tritonserver`` from PATH when there is one, else the one inside the nvidia-pytriton wheel.

    >>> install = find_tritonserver()
    >>> install.binary.name
    'tritonserver'
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerInstall(binary=Path(on_path), source="path")
    install = _wheel_install()
    if install is None:
        raise ServerNotFoundError(f"no tritonserver on PATH and no nvidia-pytriton wheel: {INSTALL_HINT}")
    return install


def _wheel_install() -> Optional[ServerInstall]:
    """The server tree inside the nvidia-pytriton wheel, without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "tritonserver"  # site-packages/pytriton/tritonserver
    if not (root / "bin" / "tritonserver").is_file():
        return None
    return ServerInstall(
        binary=root / "bin" / "tritonserver",
        source="wheel",
        version=importlib.metadata.version("nvidia-pytriton"),
        backend_dir=root / "backends",
        caches_dir=root / "caches",
        # The binary finds these through a relative rpath, which breaks once the tree is copied.
        library_dirs=(root.parent.parent / "nvidia_pytriton.libs",),
    )


def default_cache_dir() -> Path:
    """Where prepared server trees are kept: ``$XDG_CACHE_HOME/glm-build`` or ``~/.cache/glm-build``.

    >>> default_cache_dir().name
    'glm-build'
    """
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm-build"


def prepare_server_tree(install: ServerInstall, cache_dir: Optional[Path] = None) -> ServerInstall:
    """A runnable install: a PATH install as it is; for the wheel, a copy holding the Python stub.

    The copy goes to ``cache_dir/tritonserver-<pytriton version>-py<X.Y>`` and is reused when it is
    already there.

    >>> runnable = prepare_server_tree(find_tritonserver())
    >>> (runnable.backend_dir / "python" / STUB_NAME).is_file()
    True
    """
    if install.has_python_stub:
        return install
    wheel_root = install.binary.parent.parent
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_root / "python_backend_stubs" / python / STUB_NAME
    if not stub.is_file():
        raise ServerNotFoundError(
            f"nvidia-pytriton {install.version} has no Python-backend stub for Python {python} "
            f"(looked for {stub}); use a Python it ships stubs for, or the Triton container"
        )
    target = Path(cache_dir or default_cache_dir()) / f"tritonserver-{install.version}-py{python}"
    if not (target / _READY_MARK).is_file():
        _copy_server_tree(wheel_root, stub, target)
    return ServerInstall(
        binary=target / "bin" / "tritonserver",
        source=install.source,
        version=install.version,
        backend_dir=target / "backends",
        caches_dir=target / "caches",
        library_dirs=install.library_dirs,
    )


def _copy_server_tree(wheel_root: Path, stub: Path, target: Path) -> None:
    """Copy the wheel's tree plus ``stub`` to ``target``, built aside and renamed into place.

    Renaming a finished folder means a second process preparing the same tree at the same time
    (another test run) never sees half a copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tree = staging / "tree"
        shutil.copytree(wheel_root, tree, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tree / "backends" / "python" / STUB_NAME)
        (tree / _READY_MARK).write_text(f"{wheel_root}\n")
        if target.exists() and not (target / _READY_MARK).is_file():
            shutil.rmtree(target)  # left half-done by an older, interrupted copy
        try:
            tree.rename(target)
        except OSError:
            if not (target / _READY_MARK).is_file():  # not a concurrent copy that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def server_environment(install: ServerInstall, base: Optional[dict] = None) -> dict[str, str]:
    """The environment ``tritonserver`` and its Python-backend stubs need.

    >>> env = server_environment(prepare_server_tree(find_tritonserver()))
    >>> env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    True
    """
    env = dict(os.environ if base is None else base)
    # The stub's embedded interpreter ignores PYTHONPATH: it finds its site-packages through the
    # `python3` on PATH, so this Python's bin/ (the venv's) goes first.
    env["PATH"] = _prepend([os.path.dirname(sys.executable)], env.get("PATH"))
    if install.source == "wheel":
        # The wheel's stub links libpython3.X.so from this Python's LIBDIR, and its libraries sit in
        # nvidia_pytriton.libs/ (the relative rpath does not survive the copy).
        libdir = sysconfig.get_config_var("LIBDIR")
        dirs = ([libdir] if libdir else []) + [str(d) for d in install.library_dirs]
        env["LD_LIBRARY_PATH"] = _prepend(dirs, env.get("LD_LIBRARY_PATH"))
    return env


def _prepend(dirs: list[str], current: Optional[str]) -> str:
    return os.pathsep.join(dirs + ([current] if current else []))
