"""Safe file writing shared by every writer in the package.

Two rules hold for everything the package writes (datasets, checkpoints, explanation results):
an interrupted run never leaves a half-written file that a later step would trust (we write to a
temporary name and rename when complete), and a name taken from user data can never point outside
the folder it is written into.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")


def check_safe_id(image_id: str, what: str = "image id") -> str:
    """Return ``image_id`` if it can be used as a file name; raise ``ValueError`` otherwise.

    Ids become file names (``images/<id>.png``), so separators, ``..`` and leading dots are refused:
    no id may ever address a file outside its folder.
    """
    text = str(image_id)
    if not _SAFE_ID.fullmatch(text) or ".." in text or len(text) > 200:
        raise ValueError(
            f"Unsafe {what} {text!r}: ids become file names, so they may only contain letters, digits, "
            "'.', '_' and '-', must not start with '.', and must not contain '..' or path separators."
        )
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Refuses (``FileExistsError``) when ``path`` exists and ``overwrite`` is False. Works for files
    and for folders (whatever the block creates at the temporary path is moved).

    The old version is never deleted before the new one is in place: a file is replaced with one
    atomic ``os.replace``; a folder is swapped with two renames (old folder to a backup name, new
    folder onto ``path``) and the backup is removed only afterwards, so a complete version exists
    at every moment, and a failure between the renames puts the old folder back. Temporary names
    carry the writer's process id: leftovers of a killed run (``.<name>.<pid>.*.partial``) are
    removed by the next write to the same path, and a backup left by a run killed between the two
    renames is renamed back onto ``path`` (or removed when ``path`` exists).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_leftovers(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True to replace it).")
    tmp = _sibling(path, "partial")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"Nothing was written to the temporary path for {path}.")
        if path.exists() and (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
            _swap_folders(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _sibling(path: Path, kind: str) -> Path:
    """An unused hidden name next to ``path``: ``.<name>.<pid>.<random>.<kind>``."""
    while True:
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")
        if not candidate.exists():
            return candidate


def _swap_folders(new: Path, path: Path) -> None:
    backup = _sibling(path, "old")
    os.replace(path, backup)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(backup, path)
        raise
    _remove(backup)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: it exists but is not ours; elsewhere: assume alive, keep its files
        return True
    return True


def _recover_leftovers(path: Path) -> None:
    """Clean up after a writer of ``path`` that was killed (see :func:`atomic_path`)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.)?[A-Za-z0-9_]+\.(partial|old)\Z")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None:
            continue
        pid, kind = match.group(1), match.group(2)
        if pid is not None and _pid_alive(int(pid)):
            continue
        if pid is None and kind == "old":
            continue
        try:
            if kind == "old" and not path.exists():
                os.replace(sibling, path)  # the complete old version, left by a kill between two renames
            else:
                _remove(sibling)
        except OSError:
            pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def files_below(folder: str | os.PathLike, exclude: str = "") -> set[str]:
    """Every file (and symlink) below ``folder`` as a POSIX path relative to it, less ``exclude``: what a
    writer lists in its marker (``{"files": [...]}``), to tell its own files from files a user added later."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()} - {
        exclude}


def check_only_listed_files(folder: Path, marker: str, refuse: str) -> None:
    """Raise ``FileExistsError`` (ending with ``refuse``) when ``folder`` holds a file its ``marker``
    (a JSON file in it listing ``files``, see :func:`files_below`) does not list, or the marker is unreadable."""
    try:
        listed = {str(name) for name in json.loads((folder / marker).read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileExistsError(f"{folder / marker} is unreadable ({err}): {refuse}.") from err
    extra = sorted(files_below(folder, marker) - listed)
    if extra:
        raise FileExistsError(f"{folder} holds files that were not written there by segx_helpers ({extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}): {refuse}.")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the folder of ``path`` for a read-modify-write of the file: two processes that
    update the same JSON file (two notebooks run at once on one root) then take turns instead of one losing the
    other's entry. The lock is the folder's own (``flock`` on it), so no lock file is left behind; where the
    platform has no ``fcntl`` (Windows) the block runs unlocked."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


def write_json(path: str | os.PathLike, data: object, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} as JSON")
