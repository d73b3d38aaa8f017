"""What ``batch --resume`` compares of a case: the identity of its input files (path, size, times).

Only the file system's metadata is read (no voxel data), so checking a cohort costs one ``stat``
per file; a DICOM folder is identified by a digest of its listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .case_ids import first_image, image_paths

__all__ = ["case_identity", "input_identity"]


def input_identity(path: str | Path | None) -> dict | None:
    """What ``batch --resume`` compares of one input: its resolved path, size and modification time.

    A file: ``{"path", "size", "mtime_ns"}``; a MetaImage/NRRD header with a detached data file
    also its data file's identity (``"data_file"``). A folder (a DICOM series): ``{"path",
    "files", "listing"}``, the listing being a digest of the name, size and modification time of
    every file directly in it. A path that cannot be read: ``{"path", "missing": True}``.
    Replacing, editing, adding or removing a file changes the identity; only the file system's
    metadata is read (no voxel data), so checking a cohort costs one ``stat`` per file.

    Parameters
    ----------
    path : path or None

    Returns
    -------
    dict or None
        JSON-ready; ``None`` for ``None``.
    """
    if path is None:
        return None
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    try:
        info = os.stat(real)
    except (OSError, ValueError):
        return {"path": real, "missing": True}
    if stat.S_ISDIR(info.st_mode):
        digest, count = hashlib.sha256(), 0
        try:
            with os.scandir(real) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        found = entry.stat()
                        digest.update(os.fsencode(entry.name) + f"\0{found.st_size}\0{found.st_mtime_ns}\n".encode())
                        count += 1
        except OSError:
            return {"path": real, "missing": True}
        return {"path": real, "files": count, "listing": digest.hexdigest()[:16]}
    identity: dict = {"path": real, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if real.lower().endswith((".nhdr", ".mhd")):
        from .. import io

        try:
            data_file = io.detached_data_file(real, trust=True)  # the header as the reader parses it
        except Exception:  # an unreadable header: reading the case reports it
            data_file = None
        if data_file is not None and os.path.realpath(data_file) != real:
            identity["data_file"] = input_identity(data_file)
    return identity


def case_identity(image: str | Path | Sequence[str | Path], mask: str | Path | None = None,
                  region_mask: str | Path | None = None, volume: int | None = None, series: str | None = None) -> dict:
    """The identity of a case's inputs, as ``batch --resume`` compares them: each file's
    :func:`input_identity` (``None`` where there is no mask or region mask), the volume and the
    series. A case of several channels (``image`` a list of paths) also has ``channels``, the
    identity of each channel in order; ``image`` is then the first channel's."""
    paths = image_paths(image)
    identity: dict[str, Any] = {"image": input_identity(first_image(image)), "mask": input_identity(mask),
                "region_mask": input_identity(region_mask), "volume": volume, "series": series}
    if len(paths) > 1:
        identity["channels"] = [input_identity(p) for p in paths]
    return identity
