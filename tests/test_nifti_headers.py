"""Every NIfTI medcam3d writes follows one header rule (:func:`medcam3d.io.set_nifti_geometry`).

For each source scan (``like``): an LPS oblique scan (codes 1, 1), a sheared scan whose header has
codes 1 and 1 as scanner converters write them, and an oblique scan saved with codes (2, 0) (what
``nib.save(nib.Nifti1Image(data, affine))`` writes), every file written from it (``io.write``, the
``medcam3d explain`` maps, ``_norm``, ``_feature`` and ``_mask`` files, the napari writer, MONAI's
``SaveHeatmapsd``) has the sform/qform codes ``io.write`` gives for that ``like`` on that file's
grid, and where the qform code is not 0 the qform places the 8 corners of the volume where the
sform does (1e-4 mm).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d import io
from medcam3d.space import Space
from _images import oblique_lpi_affine

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (40, 36, 24)
SHEAR = (0.35, 0.2)


def _lps_oblique() -> np.ndarray:
    affine = oblique_lpi_affine(spacing=(1.6, 1.6, 2.5), angles=(6.0, -4.0, 10.0))
    affine[:3, 2] *= -1  # L-P-S: the slice axis runs superior
    return affine


def _sheared() -> np.ndarray:
    affine = np.diag([1.8, 1.8, 2.5, 1.0])
    affine[0, 1] = SHEAR[0] * 1.8  # voxel axes not at right angles
    affine[1, 2] = SHEAR[1] * 2.5
    affine[:3, 3] = (-30.0, -40.0, -25.0)
    return affine


def _scan(path: Path, affine: np.ndarray, codes: tuple[int, int]) -> Path:
    """A CT-like scan with a bright ball at its centre, saved with sform/qform ``codes``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    centre = (np.array(SHAPE) - 1) / 2
    ball = np.linalg.norm((ijk - centre) * np.array([1.8, 1.8, 2.5]), axis=-1) < 9
    data = np.where(ball, 250.0, -50.0).astype(np.float32) + np.random.default_rng(0).normal(0, 5, SHAPE).astype(np.float32)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=codes[0])
    image.set_qform(affine, code=codes[1])  # a sheared affine: its closest rotation, as converters store it
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return path


CASES = {"lps_oblique_11": (_lps_oblique, (1, 1)), "sheared_11": (_sheared, (1, 1)),
         "oblique_20": (_lps_oblique, (2, 0))}


@pytest.fixture(scope="module", params=sorted(CASES))
def scan(request, tmp_path_factory):
    make, codes = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return _scan(folder / "scan.nii.gz", make(), codes)


def _expected(like: Path, space: Space, folder: Path) -> tuple[int, int]:
    """The codes ``io.write`` gives a file on ``space`` with this ``like``."""
    path = io.write(folder / f".expected_{abs(hash(space.affine.tobytes()))}.nii.gz", np.zeros(space.shape, np.uint8),
                    space, like=like)
    header = nib.load(path).header
    return int(header["sform_code"]), int(header["qform_code"])


def _check(path: Path, like: Path, folder: Path) -> None:
    image = nib.load(str(path))
    header = image.header
    shape = image.shape[:3]
    sform = header.get_sform()
    codes = int(header["sform_code"]), int(header["qform_code"])
    assert codes == _expected(like, Space(shape, sform), folder), path.name
    assert codes[0] > 0, path.name
    assert header.get_xyzt_units() == nib.load(str(like)).header.get_xyzt_units(), path.name
    if codes[1]:
        ext = [n - 1 for n in shape]
        corners = np.array([[i, j, k, 1.0] for i in (0, ext[0]) for j in (0, ext[1]) for k in (0, ext[2])])
        distance = np.linalg.norm((corners @ (header.get_qform() - sform).T)[:, :3], axis=1).max()
        assert distance < 1e-4, (path.name, distance)


def test_io_write_keeps_one_affine(scan, tmp_path):
    data, space = io.read(scan)
    like_codes = nib.load(str(scan)).header
    out = io.write(tmp_path / "copy.nii.gz", data, space, like=scan)
    header = nib.load(str(out)).header
    scode, qcode = int(like_codes["sform_code"]), int(like_codes["qform_code"])
    want = (scode or qcode, 0 if space.is_sheared else (qcode or scode))
    assert (int(header["sform_code"]), int(header["qform_code"])) == want
    _check(out, scan, tmp_path)


def test_explain_outputs_follow_the_rule(scan, tmp_path):
    from medcam3d.cli import main

    assert main(["explain", "--config", str(ROOT / "configs" / "demo.yaml"), "--image", str(scan),
                 "--target", "bright_round", "--out", str(tmp_path / "out"), "--no-pictures"]) == 0
    written = sorted((tmp_path / "out" / "scan").glob("*.nii*"))
    names = [p.name for p in written]
    for suffix in ("bright_round.nii.gz", "bright_round_norm.nii.gz", "bright_round_feature.nii.gz",
                   "bright_round_mask.nii.gz"):
        assert any(name.endswith(suffix) for name in names), (suffix, names)
    for path in written:
        _check(path, scan, tmp_path)


def test_napari_writer_follows_the_rule(scan, tmp_path):
    pytest.importorskip("napari")
    from medcam3d.napari._writer import write_heatmap, write_mask

    data, space = io.read(scan)
    metadata = {"affine": space.affine, "path": str(scan), "descrip": "test"}
    [heat] = write_heatmap(str(tmp_path / "heat.nii.gz"), data, {"metadata": metadata})
    [mask] = write_mask(str(tmp_path / "mask.nii.gz"), (data > 100).astype(np.uint8), {"metadata": metadata})
    for path in (heat, mask):
        _check(Path(path), scan, tmp_path)


def test_monai_saver_follows_the_rule(scan, tmp_path):
    from monai.data import decollate_batch, list_data_collate
    from monai.networks.nets import DenseNet
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd, Spacingd

    from medcam3d.monai import HeatmapInferer, SaveHeatmapsd

    torch.manual_seed(0)
    network = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                       block_config=(1, 1)).eval()
    preprocessing = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
                             Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(3.0, 3.0, 3.0)),
                             ResizeWithPadOrCropd(keys="image", spatial_size=(24, 24, 24))])
    x = list_data_collate([preprocessing({"image": str(scan)})])["image"]
    with torch.no_grad():
        pred = HeatmapInferer(class_names=["a", "b"])(x, network)
    item = decollate_batch({"pred": pred, "image": x})[0]
    written = []
    for grid, folder in (("scan", "maps"), ("feature", "feature")):
        saver = SaveHeatmapsd(keys="pred", output_dir=tmp_path / folder, normalized=True, grid=grid)
        saver(item)
        written += saver.written
    assert written
    for path in written:
        _check(Path(path), scan, tmp_path)
