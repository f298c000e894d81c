"""Files written whole or not at all: a crash or power cut leaves the previous file or the complete new one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def durable_file(path) -> Iterator[Path]:
    """A temporary path beside `path` to write the new file into; when the block ends without an error, the file is
    synced, renamed to `path` and the rename synced, so that a crash or power cut leaves the previous file or the
    whole new one. On an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        _sync(temporary)  # the file's data before the rename, the folder's entries before and after it
        _sync(path.parent)
        os.replace(temporary, path)
        _sync(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _sync(path: Path) -> None:
    """fsync a closed file (its data) or a folder (the names created or renamed in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
