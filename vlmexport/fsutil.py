"""Output folders are written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmexport.errors import UsageError


def check_output_dir(target: Path, force: bool) -> None:
    """Refuse an occupied or unwritable target before any work is done.

    Raises:
        UsageError: target is a non-empty folder (without force), a file, or its parent is unwritable.
    """
    if target.exists() and not target.is_dir():
        raise UsageError(f"output {target} is a file", "choose a folder path for the output")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"output folder {target} is not empty", "choose another folder or pass --force to replace it")
    parent = target.resolve().parent
    parent_existing = next((p for p in (parent, *parent.parents) if p.exists()), parent)
    if not os.access(parent_existing, os.W_OK):
        raise UsageError(f"cannot write into {parent_existing}", "choose an output folder you can write to")


@contextmanager
def atomic_output_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on error it is removed.

    Raises:
        UsageError: see check_output_dir.
    """
    target = Path(target)
    check_output_dir(target, force)
    try:
        target.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.resolve().parent))
    except OSError as exc:
        raise UsageError(f"cannot write into {target.resolve().parent} ({exc.strerror})", "choose an output folder you can write to") from exc
    try:
        yield tmp
        _readable_like_new_files(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def _readable_like_new_files(root: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600; a bundle must be readable
    # by whatever serves it, so give everything the permissions the umask gives new files.
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed over it only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
