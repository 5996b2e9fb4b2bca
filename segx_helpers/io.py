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
import tempfile
from pathlib import Path
from typing import Iterator

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def check_safe_id(image_id: str, what: str = "image id") -> str:
    """Return ``image_id`` if it can be used as a file name; raise ``ValueError`` otherwise.

    Ids become file names (``images/<id>.png``), so separators, ``..`` and leading dots are refused:
    no id may ever address a file outside its folder.
    """
    text = str(image_id)
    if not _SAFE_ID.match(text) or ".." in text or len(text) > 200:
        raise ValueError(
            f"Unsafe {what} {text!r}: ids become file names, so they may only contain letters, digits, "
            "'.', '_' and '-', must not start with '.', and must not contain '..' or path separators."
        )
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Refuses (``FileExistsError``) when ``path`` exists and ``overwrite`` is False. Works for files
    and for folders (whatever the block creates at the temporary path is moved).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True to replace it).")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"Nothing was written to the temporary path for {path}.")
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} as JSON")
