"""Plain-ASCII aliases for the paths Triton 2.51's Python-backend stub cannot take.

Triton 2.51 starts each stub through ``bash -c`` with the model's path pasted in unquoted (a space
splits it, a quote opens a string, a backslash vanishes; quoted on Linux only from 2.60), and the
stub embeds Python with an isolated configuration that encodes file names as ASCII whatever
``LANG`` says (a Chinese folder name raises ``UnicodeEncodeError``). So ``glm-serve`` never hands
the stub such a path: it serves the repository through a symbolic link with a plain name in a
private runtime folder of its own (mode 0700, removed when it stops), and does the same for every
path a model's parameters lead the stub to (``checkpoint``, ``tokenizer``: a ``--weights-uri``
mount, a hand-edited config). The stub learns those aliases from :data:`~.params.ALIASES_ENV`, JSON in
ASCII, through :func:`builder.serving.params.resolve_path`.

>>> paths = StubPaths.open(Path("my 模型 repo"))
>>> paths.repository                      # what tritonserver is given
PosixPath('/run/user/0/glm-serve-4242-k2j1/repo')
>>> paths.close()                         # the aliases and their folder are gone
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .params import ALIASES_ENV, RouterParameters, VariantParameters

# What bash leaves alone in an unquoted word and an ASCII codec encodes: anything else gets an alias.
_SAFE = re.compile(r"[A-Za-z0-9_./+,:@%=-]*")
_PREFIX = "glm-serve-"


def stub_safe(path) -> bool:
    """Whether the stub can be given ``path`` as it is.

    >>> stub_safe("/srv/repo/chatglm2-6b"), stub_safe("/srv/my repo"), stub_safe("/srv/模型")
    (True, False, False)
    """
    return bool(_SAFE.fullmatch(str(path)))


def runtime_base() -> Path:
    """Where the runtime folder goes: ``$XDG_RUNTIME_DIR``, the temp folder, or ``/tmp``, the first
    with a stub-safe path."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
        if base and stub_safe(base) and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return Path(base)
    raise RuntimeError("no writable folder with a plain-ASCII path for glm-serve's runtime folder "
                       "(set XDG_RUNTIME_DIR to one)")


def path_parameters() -> tuple[str, ...]:
    """The model parameters the stub reads as paths (the ``Path`` fields of the parameter
    dataclasses): ``('checkpoint', 'tokenizer')``."""
    from typing import get_type_hints


    names = []
    for cls in (VariantParameters, RouterParameters):
        hints = get_type_hints(cls)
        names += [f.name for f in dataclasses.fields(cls) if hints[f.name] is Path]
    return tuple(dict.fromkeys(names))


def model_paths(repository: Path, config_name: Optional[str] = None) -> Iterator[tuple[str, Path]]:
    """``(model, path)`` for each path parameter in each model config of ``repository``, as
    written (relative to the model's folder, or absolute)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names = path_parameters()
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        config = model / "configs" / f"{config_name}.pbtxt" if config_name else None
        if config is None or not config.is_file():
            config = model / "config.pbtxt"
        if not config.is_file():
            continue
        try:
            parsed = text_format.Parse(config.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        except text_format.ParseError:
            continue  # Triton names the broken config itself
        for key in names:
            if key in parsed.parameters and parsed.parameters[key].string_value:
                yield model.name, Path(parsed.parameters[key].string_value)


@dataclasses.dataclass
class StubPaths:
    """The repository path tritonserver gets, and the aliases behind it (in ``folder``)."""

    repository: Path  # absolute, stub-safe: the repository itself or its alias
    original: Path  # the repository as the user named it, absolute
    folder: Optional[Path] = None  # the runtime folder holding the aliases; None: none needed
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # stub's path -> alias

    @classmethod
    def open(cls, repository: Path, config_name: Optional[str] = None,
             base: Optional[Path] = None) -> "StubPaths":
        """Make the aliases serving ``repository`` needs (none when every path is safe)."""
        original = Path(os.path.abspath(repository))
        paths = cls(repository=original, original=original)
        try:
            if not stub_safe(original):
                paths.repository = paths._link(original, "repo", base)
            for model, path in model_paths(original, config_name):
                seen = paths.repository / model / path  # what resolve_path computes in the stub
                if not stub_safe(seen):
                    target = original / model / path  # an absolute path stays itself
                    paths.aliases[str(seen)] = str(paths._link(target, f"{model}-{path.name}", base))
        except BaseException:
            paths.close()
            raise
        return paths

    def _link(self, target: Path, name: str, base: Optional[Path]) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-",
                                                dir=base or runtime_base()))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        alias = self.folder / name
        n = 1
        while alias.exists() or alias.is_symlink():
            n += 1
            alias = self.folder / f"{name}-{n}"
        alias.symlink_to(os.path.abspath(target))
        return alias

    @property
    def aliased(self) -> bool:
        return self.folder is not None

    def environment(self) -> dict[str, str]:
        """What the server's environment needs so that the stubs find the aliases."""
        return {ALIASES_ENV: json.dumps(self.aliases, ensure_ascii=True)} if self.aliases else {}

    def note(self) -> str:
        """The one log line that says what is served through what."""
        names = ", ".join(f"{k} -> {v}" for k, v in self.aliases.items())
        return (f"glm-serve: serving {self.original} as {self.repository}"
                + (f" (and {names})" if names else "")
                + ": Triton 2.51's Python backend cannot start a model whose path holds spaces, "
                "quotes, backslashes or non-ASCII characters; the aliases go when glm-serve stops\n")

    def close(self) -> None:
        """Remove the aliases and their folder (the repository itself is untouched)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # removes the links, not what they point at
            self.folder = None
