"""The hub's ``hosts/`` directory: node host files written atomically and only on change.

tinc 1.0 drops, on SIGHUP, every connection whose host file mtime changed, so a host file
is rewritten only when its bytes differ. Writes use a unique temporary file in the same
directory, fsync, rename, then fsync the directory, so concurrent writers and crashes never
leave a torn file.
"""

import os
import tempfile
from pathlib import Path
from typing import List, Optional


def render_node_host_file(address: str, public_pem: str) -> str:
    """The hub's copy of a node host file: its /32 Subnet and its RSA public key, nothing else."""
    return f"Subnet = {address}/32\n\n{public_pem.strip()}\n"


def read_text_or_none(path: Path) -> Optional[str]:
    """The file's text, or None when it does not exist or is unreadable as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, IsADirectoryError):
        return None


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Atomically replace ``path`` with ``content`` unless it already holds exactly that.

    Returns True when the file was written, False when it was already identical (untouched,
    mtime kept).
    """
    data = content.encode("utf-8")
    try:
        with open(path, "rb") as existing:
            if existing.read() == data and (os.fstat(existing.fileno()).st_mode & 0o7777) == mode:
                return False
    except (FileNotFoundError, IsADirectoryError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return True


def remove_stale_temp_files(directory: Path) -> List[str]:
    """Delete the temporary files a crash in :func:`write_if_changed` can leave
    (``.NAME.XXXX.tmp``); tinc never reads them, but they are half-written. Returns their names."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                (directory / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        fsync_dir(directory)
    return removed


def remove_if_present(path: Path) -> bool:
    """Delete ``path``; True when something was removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
