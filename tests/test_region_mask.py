"""Region masks on the scan's grid (API, explain --region-mask, the batch CSV column), boxes of Region
targets, and faithfulness metrics on TorchScript models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

import medcam3d
from medcam3d.cli import main
from medcam3d.errors import TargetError
from medcam3d.preprocess import preprocess
from medcam3d.space import Resampler, Space
from medcam3d.output_grids import nearest_resample, output_grid
from medcam3d.targets import Region, region_from_scan_mask
from _images import oblique_lpi_affine, planted_scan

SHAPE = (31, 27, 13)  # odd, anisotropic (0.9 x 1.1 x 2.5 mm), oblique, stored L-P-I
CENTRE_MM = (50.0, -45.0, 30.0)
RADIUS_MM = 6.0
STEPS = [
    {"name": "Orientation", "axcodes": "RAS"},
    {"name": "Spacing", "pixdim": [1.7, 1.3, 2.1]},
    {"name": "ResizeWithPadOrCrop", "spatial_size": [24, 24, 16]},
]
SEG_CONFIG = """model:
  network: monai.networks.nets.UNet
  args: {spatial_dims: 3, in_channels: 1, out_channels: 3, channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}
  weights: none
task: segmentation
class_names: [background, organ, tumour]
target: [1, 2]
preprocessing:
  - {name: Orientation, axcodes: RAS}
  - {name: Spacing, pixdim: [1.7, 1.3, 2.1]}
  - {name: ResizeWithPadOrCrop, spatial_size: [24, 24, 16]}
output: {pictures: false, scan_dtype: float32, normalized: false}
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An oblique, anisotropic, odd-shaped scan with a ball planted at CENTRE_MM, and its 0/1 region."""
    root = tmp_path_factory.mktemp("region")
    affine = oblique_lpi_affine()
    image, inside = planted_scan(SHAPE, affine, centre_mm=CENTRE_MM, radius_mm=RADIUS_MM)
    assert 50 < inside.sum() < inside.size // 10
    nib.save(nib.Nifti1Image(image, affine), root / "scan.nii.gz")
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), root / "region.nii.gz")
    (root / "seg.yaml").write_text(SEG_CONFIG, encoding="utf-8")
    return root, image, inside, Space(SHAPE, affine)


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def _brute_nearest(data, source: Space, target: Space, fill):
    """Nearest neighbour by scipy (order=0 pull through the composed voxel map), outside the closed field of
    view [-0.5, n - 0.5] -> fill."""
    voxel_map = np.linalg.inv(source.affine) @ target.affine
    pulled = ndimage.affine_transform(data.astype(np.float64), voxel_map[:3, :3], voxel_map[:3, 3],
                                      output_shape=target.shape, order=0, mode="nearest")
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), -1) @ voxel_map[:3, :3].T
    coords = coords + voxel_map[:3, 3]
    inside = np.all((coords >= -0.5) & (coords <= np.asarray(source.shape) - 0.5), axis=-1)
    return np.where(inside, pulled, fill)


# ---------------------------------------------------------------------------------- resampling
def test_nearest_resample_is_an_exact_lookup_on_parallel_and_oblique_grids():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 7, size=(9, 8, 5))
    source = Space(data.shape, oblique_lpi_affine())
    # a sub-grid whose voxel centres are source voxel centres: axes permuted, flipped, every other voxel
    picks = np.zeros((4, 4))
    picks[0, 2], picks[1, 0], picks[2, 1], picks[:3, 3], picks[3, 3] = 1, -2, 2, (0, 6, 0), 1
    target = Space((5, 4, 3), source.affine @ picks)
    expected = np.full(target.shape, -1)
    for a, b, c in np.ndindex(*target.shape):
        i, j, k = c, 6 - 2 * a, 2 * b
        if 0 <= j < 8 and 0 <= k < 5:
            expected[a, b, c] = data[i, j, k]
    np.testing.assert_array_equal(nearest_resample(data, source, target, fill=-1), expected)
    # oblique with respect to the source (rotated, other spacing and shape): the separable path is not taken
    tilt = np.eye(4)
    tilt[:3, :3] = np.array([[0.8, 0.3, 0.0], [-0.3, 0.8, 0.2], [0.0, -0.2, 1.1]])
    tilt[:3, 3] = (1.3, -0.7, 0.4)
    oblique = Space((11, 7, 6), source.affine @ tilt)
    result = nearest_resample(data, source, oblique, fill=-1, chunk_voxels=50)  # several slabs
    np.testing.assert_array_equal(result, _brute_nearest(data, source, oblique, -1))
    assert (result >= 0).any() and (result == -1).any()


def test_nearest_resample_keeps_centres_on_either_outer_cell_edge_like_space_resample():
    """The field of view is closed, [-0.5, n - 0.5]: a target centre exactly on the far edge of the last
    source cell takes that cell's voxel, as one on the near edge takes voxel 0, whichever way the axis runs."""
    data = np.arange(4 * 3 * 2).reshape(4, 3, 2) + 1
    source = Space(data.shape, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = -1.5  # target centres along i at -1.5, -0.5, 0.5, ..., 3.5 (= n - 0.5), 4.5
    target = Space((7, 3, 2), shifted)
    result = nearest_resample(data, source, target, fill=0)
    np.testing.assert_array_equal(result[0], 0)
    np.testing.assert_array_equal(result[1], data[0])  # on the near edge: inside, voxel 0
    np.testing.assert_array_equal(result[2:5], data[1:4])  # half-way between two centres: the higher index
    np.testing.assert_array_equal(result[5], data[3])  # on the far edge: inside, the last voxel (clipped)
    np.testing.assert_array_equal(result[6], 0)
    # the same centres with the target's i axis flipped (scale -1): the same values, in reverse order
    flipped = shifted @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 4.5
    np.testing.assert_array_equal(nearest_resample(data, source, Space((7, 3, 2), flipped), fill=0), result[::-1])
    # one implementation: space.resample(mode="nearest"), separable or in slabs
    for separable in (None, False):
        np.testing.assert_array_equal(Resampler(source, target, separable=separable)(data, mode="nearest"), result)
    np.testing.assert_array_equal(result, _brute_nearest(data, source, target, 0))
    assert nearest_resample(data.astype(bool), source, target, fill=False).dtype == bool


def test_a_scan_grid_region_lands_on_the_expected_output_voxels(planted):
    root, image, inside, scan_space = planted
    x, _ = preprocess(root / "scan.nii.gz", STEPS)
    input_space = Space.of(x)
    assert not np.allclose(input_space.affine[:3, :3], np.diag(np.diag(input_space.affine[:3, :3])))  # still oblique
    region = region_from_scan_mask(inside, scan_space, input_space)
    assert region.dtype == bool and region.shape == input_space.shape
    np.testing.assert_array_equal(region, _brute_nearest(inside, scan_space, input_space, 0).astype(bool))
    # the planted ball, in world mm: output voxels well inside it are in, those well outside are out
    centres = np.stack(np.meshgrid(*[np.arange(n) for n in input_space.shape], indexing="ij"), -1).reshape(-1, 3)
    distance = np.linalg.norm(input_space.voxel_to_world(centres) - CENTRE_MM, axis=1).reshape(input_space.shape)
    half_diagonal = 0.5 * float(np.linalg.norm(scan_space.spacing))
    assert region[distance <= RADIUS_MM - half_diagonal].all()
    assert not region[distance > RADIUS_MM + half_diagonal].any()
    assert region.sum() > 10
    # an output at half the input's resolution: the grid whose cells tile the input grid
    coarse = region_from_scan_mask(torch.from_numpy(inside), scan_space, x, (12, 12, 8))
    grid = output_grid(input_space, (12, 12, 8))
    np.testing.assert_array_equal(coarse, _brute_nearest(inside, scan_space, grid, 0).astype(bool))


def test_explaining_with_the_scan_grid_mask_equals_the_output_grid_mask(planted):
    root, image, inside, scan_space = planted
    x, _ = preprocess(root / "scan.nii.gz", STEPS)
    explainer = medcam3d.Explainer(_unet(), "hirescam")
    on_output = region_from_scan_mask(inside, scan_space, Space.of(x))
    given = explainer(x[None], Region([1, 2], mask=on_output), relu=False)
    from_scan = explainer(x[None], Region([1, 2], mask=inside, space=scan_space), relu=False)
    torch.testing.assert_close(from_scan.maps, given.maps, rtol=0, atol=0)
    torch.testing.assert_close(from_scan.scores, given.scores, rtol=0, atol=0)
    expected = (given.logits[0, 1:3] * torch.from_numpy(on_output)).flatten(1).sum(1)
    torch.testing.assert_close(from_scan.scores[0], expected, rtol=1e-5, atol=1e-4)

    class Coarse(nn.Module):  # a segmentation output at half the input's resolution
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.features = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Conv3d(4, 3, 1)

        def forward(self, inputs):
            return self.head(self.features(inputs))

    coarse = medcam3d.Explainer(Coarse().eval(), "hirescam", layer="features.1")
    via_space = coarse(x[None], Region(1, mask=inside, space=scan_space), relu=False)
    # its voxels sit at the centres of their receptive fields (input voxel 2u), not the convention's 2u + 0.5
    assert via_space.output_field is not None
    assert via_space.output_field.step == (2, 2, 2) and via_space.output_field.offset == (0, 0, 0)
    on_coarse = region_from_scan_mask(inside, scan_space, Space.of(x), tuple(via_space.logits.shape[2:]),
                                      receptive_field=via_space.output_field)
    direct = coarse(x[None], Region(1, mask=on_coarse), relu=False)
    torch.testing.assert_close(via_space.maps, direct.maps, rtol=0, atol=0)


def test_a_low_resolution_output_is_placed_at_its_receptive_field_centres():
    """A segmentation output at half resolution (3x3x3 conv, stride 2, padding 1): output voxel u looks at input
    voxels 2u-1..2u+1, centred on 2u. A one-voxel region on the scan at voxel 4 is output voxel 2; the
    align_corners convention places output voxel u at 2u + 0.5 and finds no output voxel nearest to voxel 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, stride=2, padding=1)).eval()
    affine = np.diag([0.8, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 20.0)
    scan_space = Space((16, 16, 16), affine)
    x = MetaTensor(torch.randn(1, 1, 16, 16, 16), affine=torch.from_numpy(affine))
    inside = np.zeros((16, 16, 16), dtype=np.uint8)
    inside[4, 4, 4] = 1
    placed = medcam3d.Explainer(model, "hirescam", layer="1")
    result = placed(x, Region(1, mask=inside, space=scan_space), relu=False)
    assert result.output_field.step == (2, 2, 2) and result.output_field.offset == (0, 0, 0)
    torch.testing.assert_close(result.scores[0, 0], result.logits[0, 1, 2, 2, 2], rtol=0, atol=0)
    grid = output_grid(scan_space, (8, 8, 8), result.output_field)  # the input grid is the scan's here
    np.testing.assert_allclose(grid.voxel_to_world(np.array([[2, 2, 2]]))[0], scan_space.voxel_to_world(np.array([[4, 4, 4]]))[0])
    convention = medcam3d.Explainer(model, "hirescam", layer="1", placement="align_corners")
    assert convention(x, "all").output_field is None
    with pytest.raises(TargetError, match="none of them is in the part"):
        convention(x, Region(1, mask=inside, space=scan_space))
    inside[4, 4, 4], inside[5, 5, 5] = 0, 1  # the convention's output voxel 2 is nearest to input voxel 5
    torch.testing.assert_close(convention(x, Region(1, mask=inside, space=scan_space), relu=False).scores[0, 0],
                               result.logits[0, 1, 2, 2, 2], rtol=0, atol=0)


def test_region_mask_errors_say_what_to_do(planted):
    root, image, inside, scan_space = planted
    x, _ = preprocess(root / "scan.nii.gz", STEPS)
    explainer = medcam3d.Explainer(_unet(), "hirescam")
    with pytest.raises(TargetError, match="region_from_scan_mask"):  # a scan-grid mask given as an output-grid one
        explainer(x[None], Region(1, mask=inside))
    with pytest.raises(TargetError, match="MetaTensor"):  # a plain tensor: the input's grid is unknown
        explainer(x[None].as_tensor(), Region(1, mask=inside, space=scan_space))
    with pytest.raises(TargetError, match="not a binary mask"):
        region_from_scan_mask(inside * 2, scan_space, x)
    with pytest.raises(TargetError, match="empty"):
        region_from_scan_mask(np.zeros(SHAPE), scan_space, x)
    with pytest.raises(TargetError, match="scan's"):
        region_from_scan_mask(inside[:-1], scan_space, x)
    shifted = scan_space.affine.copy()
    shifted[:3, 3] += 500.0  # the same grid half a metre away
    far = Space(SHAPE, shifted)
    with pytest.raises(TargetError, match="field of view"):  # wholly outside what the model sees
        region_from_scan_mask(inside, far, x)
    classifier = medcam3d.Explainer(nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                                  nn.Linear(2, 2)).eval(), "hirescam")
    with pytest.raises(TargetError, match="segmentation output"):
        classifier(x[None], Region(1, mask=inside, space=scan_space))


# ---------------------------------------------------------------------------------- the command line
def _check_top_mass(folder: Path, stem: str, region: np.ndarray, share: float = 0.5) -> np.ndarray:
    """The written mask is the top of the scan-grid map inside ``region`` holding ``share`` of its mass."""
    values = np.asarray(nib.load(folder / f"{stem}.nii.gz").dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(folder / f"{stem}_mask.nii.gz").dataobj).astype(bool)
    assert mask.any() and not (mask & ~region).any()  # inside the region only
    positive = region & (values > 0)
    total = values[positive].sum()
    tolerance = 1e-4 * total
    assert values[mask].sum() >= share * total - tolerance  # enough mass
    lowest = values[mask].min()
    assert (values[positive & ~mask] <= lowest + 1e-5 * abs(lowest)).all()  # the highest values first
    assert values[mask].sum() - values[mask & (values <= lowest * (1 + 1e-6))].sum() < share * total + tolerance  # smallest
    box = json.loads((folder / f"{stem}_box.json").read_text(encoding="utf-8"))
    found = np.argwhere(mask)
    assert box["box"]["voxel_min"] == found.min(0).tolist() and box["box"]["voxel_max"] == found.max(0).tolist()
    return mask


def test_explain_region_mask_scores_inside_the_region_and_boxes_its_top_mass(planted, tmp_path, capsys):
    root, image, inside, scan_space = planted
    args = ["explain", "--config", str(root / "seg.yaml"), "--image", str(root / "scan.nii.gz"), "--random-weights",
            "--region-mask", str(root / "region.nii.gz"), "--out", str(tmp_path)]
    assert main(args) == 0
    folder = tmp_path / "scan"
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["run"]["region_mask"]["file"] == "region.nii.gz"
    # the scores are those of the API with the same scan-grid region
    x, _ = preprocess(root / "scan.nii.gz", STEPS)
    from medcam3d.config import load_config
    from medcam3d.models import load_model

    model = load_model(load_config(root / "seg.yaml"), random_weights=True)
    expected = medcam3d.Explainer(model, "hirescam")(x[None], Region([1, 2], mask=inside, space=scan_space))
    scores = [f["score"] for f in summary["findings"]]
    np.testing.assert_allclose(scores, expected.scores[0].tolist(), rtol=1e-5)
    for finding in summary["findings"]:
        stem = f"scan_hirescam_{finding['class']}"
        box = json.loads((folder / f"{stem}_box.json").read_text(encoding="utf-8"))
        assert box["kind"] == "region_top_mass" and box["region"] == "given" and "given region mask" in box["comment"]
        assert box["threshold"] == {"method": "region_mass", "value": 0.5}
        _check_top_mass(folder, stem, inside)
    # another share, from the config
    config = root / "seg30.yaml"
    config.write_text(SEG_CONFIG.replace("normalized: false}", "normalized: false, region_mass: 0.3}"), encoding="utf-8")
    assert main([*args[:2], str(config), *args[3:-1], str(tmp_path / "b")]) == 0
    smaller = _check_top_mass(tmp_path / "b" / "scan", "scan_hirescam_organ", inside, 0.3)
    larger = np.asarray(nib.load(folder / "scan_hirescam_organ_mask.nii.gz").dataobj).astype(bool)
    assert smaller.sum() < larger.sum() and not (smaller & ~larger).any()


def test_without_a_region_mask_segmentation_boxes_lie_in_the_predicted_region(planted, tmp_path):
    root, image, inside, scan_space = planted
    assert main(["explain", "--config", str(root / "seg.yaml"), "--image", str(root / "scan.nii.gz"),
                 "--random-weights", "--target", "all", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "scan"
    x, _ = preprocess(root / "scan.nii.gz", STEPS)
    from medcam3d.config import load_config
    from medcam3d.models import load_model

    model = load_model(load_config(root / "seg.yaml"), random_weights=True)
    with torch.no_grad():
        labels = model(x[None].as_tensor())[0].argmax(0).numpy()
    predicted_on_scan = nearest_resample(labels, Space.of(x), scan_space, fill=-1)
    kinds = set()
    for c, name in enumerate(["background", "organ", "tumour"]):
        box = json.loads((folder / f"scan_hirescam_{name}_box.json").read_text(encoding="utf-8"))
        kinds.add((box["kind"], box["region"]))
        if box["box"] is not None:
            _check_top_mass(folder, f"scan_hirescam_{name}", predicted_on_scan == c)
    assert kinds == {("region_top_mass", "predicted")}


def test_region_mask_errors_exit_2_without_output(planted, tmp_path, capsys):
    root, image, inside, scan_space = planted
    affine = scan_space.affine
    bad = {
        "labels": nib.Nifti1Image(inside.astype(np.uint8) * 2, affine),
        "empty": nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine),
        "grid": nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), affine),
    }
    for name, img in bad.items():
        nib.save(img, tmp_path / f"{name}.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    expected = {"labels": "not a binary mask", "empty": "is empty", "grid": "not on the grid", "junk": "junk.nii.gz",
                "missing": "does not exist"}
    for name, message in expected.items():
        out = tmp_path / f"out_{name}"
        code = main(["explain", "--config", str(root / "seg.yaml"), "--image", str(root / "scan.nii.gz"),
                     "--random-weights", "--region-mask", str(tmp_path / f"{name}.nii.gz"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert message in err and "Traceback" not in err
        assert not out.exists() or not any(out.iterdir())  # no case folder, no staging folder
    # a classifier: a usage error
    repo = Path(__file__).resolve().parents[1]
    code = main(["explain", "--config", str(repo / "configs" / "demo.yaml"), "--image", str(root / "scan.nii.gz"),
                 "--region-mask", str(root / "region.nii.gz"), "--out", str(tmp_path / "cls")])
    assert code == 2 and "task: segmentation" in capsys.readouterr().err
    assert not (tmp_path / "cls" / "scan").exists()


def test_batch_reads_a_region_mask_column(planted, tmp_path, capsys):
    root, image, inside, scan_space = planted
    (tmp_path / "empty.nii.gz").write_bytes((root / "region.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), scan_space.affine), tmp_path / "empty.nii.gz")
    table = tmp_path / "cases.csv"
    with table.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "image", "region_mask"])
        writer.writerow(["inside", str(root / "scan.nii.gz"), str(root / "region.nii.gz")])
        writer.writerow(["predicted", str(root / "scan.nii.gz"), ""])
    from medcam3d.jobs.cases import collect_cases

    cases = collect_cases(table)
    assert cases[0].region_mask == root / "region.nii.gz" and cases[1].region_mask is None and cases[0].mask is None
    args = ["batch", "--config", str(root / "seg.yaml"), "--random-weights", "--inputs", str(table), "--quiet",
            "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    boxes = {case: json.loads((tmp_path / "out" / case / f"{case}_hirescam_organ_box.json").read_text())["region"]
             for case in ("inside", "predicted")}
    assert boxes == {"inside": "given", "predicted": "predicted"}
    _check_top_mass(tmp_path / "out" / "inside", "inside_hirescam_organ", inside)
    assert main([*args, "--resume"]) == 0
    assert "2 already done" in capsys.readouterr().err
    # a changed region mask is not "done"; an empty one fails that case only
    table.write_text(table.read_text().replace(str(root / "region.nii.gz"), str(tmp_path / "empty.nii.gz")))
    assert main([*args, "--resume"]) == 1
    rows = {row["case"]: row for row in csv.DictReader((tmp_path / "out" / "summary.csv").open(encoding="utf-8"))}
    assert rows["inside"]["status"] == "error" and "empty" in rows["inside"]["error"]
    # a classifier with a region_mask column: refused before any case
    repo = Path(__file__).resolve().parents[1]
    table.write_text(table.read_text().replace(str(tmp_path / "empty.nii.gz"), str(root / "region.nii.gz")))
    code = main(["batch", "--config", str(repo / "configs" / "demo.yaml"), "--inputs", str(table), "--quiet",
                 "--out", str(tmp_path / "cls")])
    assert code == 2 and "task: segmentation" in capsys.readouterr().err
    assert not any((tmp_path / "cls").glob("*/summary.json"))
    # a missing region mask file is refused up front
    table.write_text(table.read_text().replace(str(root / "region.nii.gz"), str(tmp_path / "nowhere.nii.gz")))
    assert main(args) == 2 and "nowhere.nii.gz" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- faithfulness on TorchScript
def test_completeness_and_curves_on_torchscript_equal_the_eager_model(tmp_path):
    from monai.networks.nets import DenseNet

    from medcam3d.metrics import completeness, perturbation_curves

    torch.manual_seed(0)
    eager = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                     block_config=(1, 1)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    reference = completeness(eager, x, strict=True)
    assert reference.head == "gap+linear" and reference.max_abs_error < 1e-4
    torch.jit.save(torch.jit.script(eager), tmp_path / "model.ts")
    for scripted in (torch.jit.load(tmp_path / "model.ts"), torch.jit.trace(eager, x)):
        found = completeness(scripted, x, strict=True)
        assert found.head == reference.head and found.layer == reference.layer
        np.testing.assert_allclose(found.map_sums, reference.map_sums, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(found.bias, reference.bias)
        assert found.max_abs_error < 1e-4
    flat = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8**3, 2)).eval()
    small = torch.randn(1, 1, 8, 8, 8)
    assert completeness(torch.jit.script(flat), small, strict=True).head == "flatten+linear"
    heat = torch.rand(8, 8, 8)
    eager_curves = perturbation_curves(flat, small[0], heat, 1, steps=4, baseline="zero")
    script_curves = perturbation_curves(torch.jit.script(flat), small[0], heat, 1, steps=4, baseline="zero")
    for mode in ("deletion", "insertion"):
        np.testing.assert_allclose(script_curves[mode].scores, eager_curves[mode].scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradxinput", "occlusion(patch=8)"])
def test_an_input_level_call_places_the_output_once_and_keeps_that_placement(method, monkeypatch):
    """The half-resolution output's receptive field is found once per call, in the pass over the user's input (it
    resolves the Region mask given on the scan's grid and is the result's output_field), not again afterwards."""
    import medcam3d.placement

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, stride=2, padding=1)).eval()
    affine = np.diag([0.8, 1.2, 2.0, 1.0])
    scan_space = Space((16, 16, 16), affine)
    x = MetaTensor(torch.randn(1, 1, 16, 16, 16), affine=torch.from_numpy(affine))
    inside = np.zeros((16, 16, 16), dtype=np.uint8)
    inside[4, 4, 4] = 1
    calls = []
    found = medcam3d.placement.receptive_field

    def counted(model_, layer, *args, **kwargs):
        calls.append(layer is model_)  # True: the output's field (the model itself as the "layer")
        return found(model_, layer, *args, **kwargs)

    monkeypatch.setattr(medcam3d.placement, "receptive_field", counted)
    result = medcam3d.Explainer(model, method)(x, Region(1, mask=inside, space=scan_space), relu=False)
    assert calls.count(True) == 1
    assert result.output_field is not None
    assert result.output_field.step == (2, 2, 2) and result.output_field.offset == (0, 0, 0)
    torch.testing.assert_close(result.scores[0, 0], result.logits[0, 1, 2, 2, 2], rtol=0, atol=0)
