"""Writing outputs atomically: the one place that writes under a temporary name and renames.

A reader (or a resumed run) sees the old file or the new one, never half of one; a failure leaves no
temporary behind. The temporary lives next to the target (same file system, so the rename is atomic)
and is named `.NAME.tmp-XXXX`, hidden and unique per writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def write_file_atomically(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False
) -> Path:
    """Call `write(handle)` on a temporary binary file next to `path`, then rename it to `path`.

    `fsync`: flush the bytes to disk before the rename (for files a crash must not leave empty, such as
    a checkpoint's pointer to its latest step). Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    return write_file_atomically(path, lambda handle: handle.write(data), fsync=fsync)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """UTF-8 text, written as given (no newline translation)."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """`data` as JSON (non-ASCII kept as UTF-8), with a final newline."""
    return write_text_atomic(
        path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    )


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """One JSON value a line (non-ASCII kept as UTF-8)."""

    def write(handle: BinaryIO) -> None:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    return write_file_atomically(path, write)


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` on a temporary sibling directory, then put it in place of `path` (an existing
    `path` is moved aside first and removed after); on any failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
