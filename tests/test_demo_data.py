"""The demo data: the phantom generator, the shipped sample cases and the trained demo model."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medcam3d.demo import synthetic, train
from medcam3d.preprocess import preprocess
from medcam3d.space import Space

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"
CONFIG = ROOT / "configs" / "demo.yaml"

# Measured with the shipped weights on these 40 held-out cases (seeds 1_000_000..1_000_039, the
# first 40 of the held-out range in data_samples/README.md): 0.975 per class, 0.95 exact match.
# The bounds sit just below (one or two more misses, e.g. from another CPU's float rounding).
ACCURACY_SEEDS = list(range(train.ACCURACY_SEED0, train.ACCURACY_SEED0 + 40))
MIN_CLASS_ACCURACY = 0.925
MIN_EXACT_MATCH = 0.9

# What data_samples/README.md promises about the shipped cases' headers:
# case id -> (axis codes, spacing mm, shape, oblique).
EXPECTED_HEADERS = {
    "case_01": ("LPS", (0.8, 0.8, 2.5), (151, 123, 49), False),
    "case_02": ("RAS", (0.9, 0.9, 3.0), (135, 107, 41), False),
    "case_03": ("LPI", (1.25, 1.25, 1.25), (97, 79, 99), False),
    "case_04": ("LPS", (0.9, 0.9, 2.5), (151, 129, 55), True),
    "case_05": ("LIP", (0.8, 0.8, 2.5), (151, 155, 41), False),
    "case_06": ("LPS", (0.8, 0.8, 2.5), (151, 123, 49), False),
}


def _config() -> dict:
    with open(CONFIG) as handle:
        return yaml.safe_load(handle)


def _rows() -> list[dict]:
    with open(SAMPLES / "cases.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _network_from_config(config: dict) -> torch.nn.Module:
    module_name, _, class_name = config["model"]["network"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**config["model"]["args"])


@pytest.fixture(scope="module")
def demo_model() -> torch.nn.Module:
    config = _config()
    model = _network_from_config(config)
    weights = (CONFIG.parent / config["model"]["weights"]).resolve()
    state = torch.load(weights, weights_only=True)
    model.load_state_dict(state)  # strict: every key matches the config's network
    return model.eval()


# --------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------


def test_config_describes_the_trained_model_and_its_preprocessing():
    config = _config()
    assert config["model"]["network"] == train.NETWORK
    assert config["model"]["args"] == train.MODEL_ARGS
    assert config["class_names"] == list(synthetic.CLASS_NAMES)
    assert config["task"] == "multilabel"
    assert (config["layer"], config["method"], config["target"]) == ("auto", "hirescam", "all")
    assert config["placement"] == train.PLACEMENT  # where the shipped measurements place the cells
    assert config["preprocessing"] == synthetic.PREPROCESSING
    assert set(config["output"]) == {"normalized", "four_d", "fill"}


def test_shipped_weights_load_safely_into_the_config_network(demo_model):
    weights = (CONFIG.parent / _config()["model"]["weights"]).resolve()
    assert weights == (SAMPLES / "demo_model.pt").resolve()
    assert weights.stat().st_size < 2 * 2**20
    state = torch.load(weights, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    with torch.no_grad():
        logits = demo_model(torch.zeros(1, 1, *synthetic.MODEL_SHAPE))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_accuracy_on_held_out_generated_cases(demo_model):
    result = train.evaluate_accuracy(demo_model, ACCURACY_SEEDS)
    assert min(result["per_class"].values()) >= MIN_CLASS_ACCURACY, result
    assert result["exact_match"] >= MIN_EXACT_MATCH, result
    assert min(result["counts"].values()) >= 10  # both classes are well represented


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def test_generator_is_deterministic():
    grid = synthetic.model_grid()
    first = synthetic.make_case(123, grid.shape, grid.affine)
    second = synthetic.make_case(123, grid.shape, grid.affine)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert first[0].dtype == np.float32 and first[1].dtype == np.uint8
    other = synthetic.make_case(124, grid)
    assert not np.array_equal(first[0], other[0])


def test_same_phantom_on_any_grid_and_whatever_is_present():
    both = synthetic.make_phantom(5, (True, True))
    bright = synthetic.make_phantom(5, (True, False))
    np.testing.assert_array_equal(both.lesions[0].centre, bright.lesions[0].centre)
    np.testing.assert_array_equal(both.body_centre, bright.body_centre)
    assert [lesion.name for lesion in bright.lesions] == ["bright_round"]
    # The noise-free phantom sampled on a scanner grid and preprocessed looks like the phantom
    # sampled directly on the model grid (what the model was trained on).
    space = synthetic.sample_grids()["lps_oblique"]
    image, _ = both.sample(space, noise=False)
    x, _ = preprocess((image, space), synthetic.PREPROCESSING)
    direct = synthetic.scale_intensity(both.sample(synthetic.model_grid(), noise=False)[0])
    assert float(np.abs(x[0].numpy() - direct).mean()) < 0.005


@pytest.mark.parametrize("present", [(True, True), (True, False), (False, True), (False, False)])
def test_labels_match_the_lesions(present):
    image, labels, info = synthetic.make_case(77, synthetic.model_grid(), present=present)
    assert info["present"] == list(present)
    assert info["labels_present"] == [name for name, p in zip(synthetic.CLASS_NAMES, present) if p]
    grid = synthetic.model_grid()
    for lesion in info["lesions"]:
        voxel = np.round(grid.world_to_voxel(lesion["centre_mm"])).astype(int)
        assert labels[tuple(voxel)] == lesion["label"]
        inside = image[labels == lesion["label"]].mean()
        around = np.median(image[(labels == 0) & (image > -150)])
        assert (inside > around + 80) if lesion["class"] == "bright_round" else (inside < around - 40)
    assert sorted(set(np.unique(labels)) - {0}) == [i + 1 for i, p in enumerate(present) if p]
    assert image.min() >= -1000 - 1e-3  # air outside the body is exactly -1000


def test_sample_grids_are_realistic_and_map_onto_the_model_grid():
    grids = synthetic.sample_grids()
    target = synthetic.model_grid()
    for name, space in grids.items():
        assert not np.allclose(space.origin, 0.0)
        x, _ = preprocess((np.full(space.shape, -1000.0, dtype=np.float32), space), synthetic.PREPROCESSING)
        assert tuple(x.shape[1:]) == target.shape, name
        np.testing.assert_allclose(np.asarray(x.affine, dtype=np.float64), target.affine, atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------------------------
# Shipped cases
# --------------------------------------------------------------------------------------------


def test_cases_csv_lists_the_files():
    rows = _rows()
    assert [row["case_id"] for row in rows] == sorted(EXPECTED_HEADERS)
    kinds = {row["labels"] for row in rows}
    assert {"bright_round;dark_elongated", "bright_round", "dark_elongated", ""} <= kinds
    for row in rows:
        assert (SAMPLES / row["file"]).is_file() and (SAMPLES / row["mask"]).is_file()
        names = [name for name in synthetic.CLASS_NAMES if row[name] == "1"]
        assert row["labels"] == ";".join(names)
    total = sum(path.stat().st_size for path in SAMPLES.iterdir() if path.is_file())
    assert total < 5 * 2**20


@pytest.mark.parametrize("case_id", sorted(EXPECTED_HEADERS))
def test_shipped_case_headers_and_masks(case_id):
    codes, spacing, shape, oblique = EXPECTED_HEADERS[case_id]
    row = next(row for row in _rows() if row["case_id"] == case_id)
    image = nib.load(SAMPLES / row["file"])
    mask = nib.load(SAMPLES / row["mask"])
    assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert image.shape == shape and mask.shape == shape
    assert "".join(nib.aff2axcodes(image.affine)) == codes
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3], axis=0), spacing, atol=1e-5)
    assert int(image.header["sform_code"]) > 0
    assert np.abs(image.affine[:3, 3]).min() > 1.0  # non-zero origin
    directions = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
    off_axis = np.sqrt(np.clip(1.0 - np.abs(directions).max(axis=0) ** 2, 0.0, 1.0))  # sine of the tilt
    angle = np.degrees(np.arcsin(off_axis)).max()
    assert (9.0 < angle < 11.0) if oblique else angle < 0.1
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-6)  # masks on the images' grids

    data = np.asarray(image.dataobj)
    labels = np.asarray(mask.dataobj)
    present = [int(row[name]) for name in synthetic.CLASS_NAMES]
    assert sorted(set(np.unique(labels)) - {0}) == [i + 1 for i, p in enumerate(present) if p]
    edges = [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]
    assert all((edge == -1000).all() for edge in edges)  # the whole body is inside the scan
    assert data.max() > 200 and (data[labels == 0] > -200).mean() > 0.1


@pytest.mark.parametrize("case_id", ["case_01", "case_04"])
def test_shipped_cases_are_reproduced_by_the_generator(case_id):
    entry = next(entry for entry in train.SAMPLE_CASES if entry[0] == case_id)
    _, grid_name, seed, present = entry
    space = synthetic.sample_grids()[grid_name]
    image, labels = synthetic.make_phantom(seed, present).sample(space)
    shipped = nib.load(SAMPLES / f"{case_id}.nii.gz")
    assert Space(shipped.shape, shipped.affine) == space
    difference = np.abs(np.asarray(shipped.dataobj, dtype=np.float32) - np.round(image))
    assert float(np.mean(difference > 1)) < 1e-4  # allow rare rounding differences across platforms
    shipped_labels = np.asarray(nib.load(SAMPLES / f"{case_id}_mask.nii.gz").dataobj)
    assert float(np.mean(shipped_labels != labels)) < 1e-4


def test_shipped_cases_reach_the_model_on_its_training_grid(demo_model):
    target = synthetic.model_grid()
    for row in _rows():
        x, scanner_space = preprocess(SAMPLES / row["file"], _config()["preprocessing"])
        assert tuple(x.shape) == (1, *target.shape)
        np.testing.assert_allclose(np.asarray(x.affine, dtype=np.float64), target.affine, atol=1e-4)
        assert scanner_space.shape == EXPECTED_HEADERS[row["case_id"]][2]


def test_localization_targets_sit_at_the_cells_receptive_field_centres():
    """train.cell_fractions: blocks centred on offset + step·u (the placement the config uses)."""
    from medcam3d.layers import receptive_field

    field = receptive_field(train.build_model(), "class_layers.relu", (1, *synthetic.MODEL_SHAPE))
    assert (field.step, field.offset) == ((4, 4, 4), (0, 0, 0))
    labels = torch.zeros(1, 64, 64, 64, dtype=torch.uint8)
    labels[0, 20, 34, 8] = 2  # one voxel of class 1: [33.5, 34.5] along axis 1, on the edge of cells 8 and 9
    fractions = train.cell_fractions(labels, 2, 4, field.offset)
    assert fractions.shape == (1, 2, 16, 16, 16) and float(fractions[0, 0].sum()) == 0.0
    cells = fractions[0, 1]
    np.testing.assert_allclose(float(cells.sum()), 1 / 64)  # the voxel's volume over a cell's
    np.testing.assert_allclose(cells[5, 8, 2] * 64, 0.5)  # half in cell 8's block [30, 34] ...
    np.testing.assert_allclose(cells[5, 9, 2] * 64, 0.5)  # ... half in cell 9's [34, 38]; cell 2's is [6, 10]
    # The align_corners convention (cell centres 4u + 1.5) is plain 4^3 average pooling.
    rng = torch.Generator().manual_seed(0)
    random = torch.randint(0, 3, (2, 64, 64, 64), generator=rng).to(torch.uint8)
    onehot = torch.stack([random == 1, random == 2], dim=1).float()
    torch.testing.assert_close(train.cell_fractions(random, 2, 4, (1.5, 1.5, 1.5)),
                               torch.nn.functional.avg_pool3d(onehot, 4))
