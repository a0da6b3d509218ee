"""The last stage of a build: the staged repository swapped into place, all or nothing.

Everything is written into a temporary folder beside ``out`` and moved into place only when it all
succeeded; an existing output is replaced only with ``force``, by renaming it aside first, so a
failed build leaves it untouched.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

# What may sit in an output folder that is not a build: the README kept in git.
_PLACEHOLDERS = {"README.md"}


class OutputExistsError(FileExistsError):
    """The output folder exists and may not be replaced."""


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output without ``force``, and anything not a build even with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputExistsError(f"--out {out} exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if set(entries) <= _PLACEHOLDERS:
        return  # empty, or only the README kept in git: nothing to lose
    if not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputExistsError(f"--out {out} already exists ({shown}); pass --force to "
                                f"replace it, or choose another --out")
    if "build.json" not in entries:
        raise OutputExistsError(f"--out {out} holds files but no build.json, so it is not a "
                                f"glm-build output; refusing to replace it even with --force")


def swap_into_place(staging: Path, out: Path, keep: Iterable[str] = _PLACEHOLDERS) -> None:
    """Move ``staging`` to ``out``; an old ``out`` is renamed aside first (and put back if the
    move fails) and deleted last. Files named in ``keep`` that only the old ``out`` has are
    carried over (the README git tracks in the default output)."""
    for name in keep:
        if (out / name).is_file() and not (staging / name).exists():
            shutil.copy2(out / name, staging / name)
    if not out.exists():
        os.rename(staging, out)
        return
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
