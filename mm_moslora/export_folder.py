"""The folder an export writes: never half-written, never a user's folder replaced, nothing left behind.

- An export is written into a hidden staging folder beside OUT (`.OUT.tmp-<pid>-<id>`) and renamed into place when
  complete. Its last file is the marker EXPORT_MARKER, so a folder with the marker is a complete export of ours.
- `--overwrite` replaces OUT only when OUT is such an export (a real folder holding the marker); a user's folder,
  a file or a symlink at OUT is refused, whatever the flag.
- A replacement moves the old OUT aside (`.OUT.old-<pid>-<id>`), renames the new one in, then deletes the old one.
  A process killed anywhere in there leaves hidden folders; the next export to the same OUT first puts things
  back: an old OUT moved aside is restored when OUT is missing (else deleted), and staging folders of processes
  that are no longer running are deleted. So after a kill, OUT is what it was before the interrupted export.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

EXPORT_MARKER = ".mm_moslora_export.json"


class OutputPathError(InputError):
    """OUT cannot be written: it exists (without overwrite), is not one of our exports, or overlaps the checkpoint."""


def is_export(folder: Path) -> bool:
    """A complete export written by mm_moslora: a real folder holding the marker."""
    return folder.is_dir() and not folder.is_symlink() and (folder / EXPORT_MARKER).is_file()


def check_output_dir(checkpoint_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Raise OutputPathError when OUT overlaps the checkpoint, or exists and may not be replaced."""
    source, target = checkpoint_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise OutputPathError(f"--output {output_dir} overlaps --checkpoint {checkpoint_dir}; write the export "
                              f"to a separate folder")
    _check_replaceable(output_dir, overwrite)


def _check_replaceable(output_dir: Path, overwrite: bool) -> None:
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise OutputPathError(f"--output {output_dir} already exists; pass --overwrite to replace it")
    if not is_export(output_dir):
        what = "a symlink" if output_dir.is_symlink() else "a file" if not output_dir.is_dir() else \
            f"a folder that is not an mm_moslora export (no {EXPORT_MARKER})"
        raise OutputPathError(f"--output {output_dir} is {what}: --overwrite only replaces an earlier export; "
                              f"choose another --output, or move it away yourself")


def _leftovers(output_dir: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, pid) of the hidden `.OUT.<kind>-<pid>-<id>` folders beside OUT, newest first."""
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.{kind}-(\d+)-[0-9a-f]+")
    if not output_dir.parent.is_dir():
        return []
    found = [(p, int(m.group(1))) for p in output_dir.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found, key=lambda item: item[0].stat().st_mtime, reverse=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted_export(output_dir: Path) -> None:
    """Undo what a killed export to `output_dir` left (see the module docstring); exports still running are left
    alone."""
    for backup, pid in _leftovers(output_dir, "old"):
        if _running(pid):
            continue
        if not os.path.lexists(output_dir):  # killed between moving the old OUT aside and renaming the new one in
            os.replace(backup, output_dir)
            log.warning("restored %s from %s (an export was interrupted while replacing it)", output_dir, backup.name)
        else:
            _remove(backup)
            log.warning("removed %s, left by an interrupted export", backup)
    for staging, pid in _leftovers(output_dir, "tmp"):
        if not _running(pid):
            _remove(staging)
            log.warning("removed %s, a partial export left by an interrupted run", staging)


@contextmanager
def staging_dir(output_dir: Path, overwrite: bool, marker: dict) -> Iterator[Path]:
    """A fresh folder beside `output_dir` to write into, completed with the marker (`marker`: what it holds) and
    renamed to `output_dir` when the block completes; deleted when it raises (KeyboardInterrupt included), so
    `output_dir` is never half-written."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = output_dir.parent / f".{output_dir.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # last: the export is complete
        if os.path.lexists(output_dir):
            try:
                _check_replaceable(output_dir, overwrite)
            except OutputPathError as err:
                raise OutputPathError(f"{err} (it appeared while exporting)") from None
            backup = output_dir.parent / f".{output_dir.name}.old-{tag}"
            os.replace(output_dir, backup)
            try:
                os.replace(staging, output_dir)
            except BaseException:
                os.replace(backup, output_dir)
                raise
            _remove(backup)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
