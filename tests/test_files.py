"""The file-safety helpers every writer shares (medcam3d._files): atomic writes, "inside", "ours"."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam3d._files import MARK, atomic_paths, atomic_write, is_inside, written_by_medcam3d


def test_atomic_paths_rename_every_target_or_none(tmp_path):
    targets = [tmp_path / "a.nii.gz", tmp_path / "b.json"]
    targets[1].write_text("old")
    with atomic_paths(targets) as temporaries:
        assert [os.path.dirname(t) for t in temporaries] == [str(tmp_path)] * 2
        assert temporaries[0].endswith(".gz") and os.path.basename(temporaries[0]).startswith(".a.nii.gz.")
        for temporary, text in zip(temporaries, ("new a", "new b")):
            with open(temporary, "w") as stream:
                stream.write(text)
    assert [p.read_text() for p in targets] == ["new a", "new b"]
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.json"]

    with pytest.raises(RuntimeError), atomic_paths(targets, suffix=".tmp") as temporaries:
        assert all(t.endswith(".tmp") for t in temporaries)
        raise RuntimeError("half-way")
    assert [p.read_text() for p in targets] == ["new a", "new b"]  # untouched
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.json"]  # no temporary left


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    def fail(name: str) -> None:
        Path(name).write_text("partial")
        raise ValueError("no")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x.txt", fail)
    assert os.listdir(tmp_path) == []


def test_is_inside_resolves_links(tmp_path):
    folder, outside = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("x")
    (folder / "leak").symlink_to(outside / "secret")  # in the folder, leads out
    (outside / "door").symlink_to(folder)  # elsewhere, leads in
    assert is_inside(folder / "file", folder) and is_inside(folder, folder)
    assert not is_inside(folder / "leak", folder)
    assert is_inside(outside / "door" / "file", folder)
    assert not is_inside(folder / ".." / "out", folder)
    assert not is_inside(tmp_path / "in2", folder)  # a common prefix is not a parent
    cache: list[str] = []
    assert is_inside(folder / "file", folder, realpath=lambda p: cache.append(p) or os.path.realpath(p))
    assert len(cache) == 2


def test_written_by_medcam3d_reads_the_mark(tmp_path):
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    image.header["descrip"] = f"{MARK} hirescam layer=x".encode()
    nib.save(image, tmp_path / "ours.nii.gz")
    image.header["descrip"] = b"someone else"
    nib.save(image, tmp_path / "theirs.nii")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    (tmp_path / "notes.dcm").write_text("not DICOM")
    assert written_by_medcam3d(tmp_path / "ours.nii.gz")
    assert not written_by_medcam3d(tmp_path / "theirs.nii")
    for name in ("broken.nii.gz", "notes.dcm", "missing.nii.gz", "missing.dcm"):
        assert not written_by_medcam3d(tmp_path / name)
