"""MONAI bundles: network and weights from MONAI's own parser, the bundle's preprocessing, trust."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d.config import parse_config
from medcam3d.errors import ConfigError
from medcam3d.errors import GeometryError, ImageReadError, PreprocessingError, UntrustedModelError
from medcam3d.models import Bundle, bundle_preprocessing, load_bundle, load_model
from medcam3d.preprocess import preprocess
from medcam3d.preprocess_bundle import BundlePreprocessing
from _images import oblique_lpi_affine, planted_scan
from conftest import TINY_NETWORK_ARGS, write_tiny_model

TINY_DEF = {"_target_": "DenseNet", **TINY_NETWORK_ARGS}
SIZE = [16, 16, 16]
#: The bundle's preprocessing and medcam3d's equivalent config.
BUNDLE_STEPS = [
    {"_target_": "LoadImaged", "keys": "@image_key"},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
    {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
    {"_target_": "ScaleIntensityd", "keys": "@image_key"},
    {"_target_": "ResizeWithPadOrCropd", "keys": "@image_key", "spatial_size": SIZE},
]
#: (MONAI's Spacing resamples in float64 by default; medcam3d's in float32 unless told otherwise.)
MEDCAM3D_STEPS = [
    {"name": "Orientation", "axcodes": "RAS"},
    {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear", "dtype": "float64"},
    {"name": "ScaleIntensity"},
    {"name": "ResizeWithPadOrCrop", "spatial_size": SIZE},
]


def write_bundle(root: Path, *, pt: bool = True, ts: bool = False, network_def: dict | None = TINY_DEF,
                 steps: list | None = None, extra: dict | None = None, yaml: bool = False) -> Path:
    """A MONAI bundle with the tiny DenseNet in ``root`` (weights from :func:`write_tiny_model`)."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    metadata = {
        "version": "0.1.0", "monai_version": "1.6.1", "name": "tiny test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": SIZE}},
            "outputs": {"pred": {"type": "probabilities", "num_channels": 2, "channel_def": {"0": "bright", "1": "dark"}}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "image_key": "image",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": BUNDLE_STEPS if steps is None else steps},
        **(extra or {}),
    }
    if network_def is not None:
        inference["network_def"] = network_def
    else:
        del inference["network"]
    if yaml:
        import yaml as pyyaml

        (root / "configs" / "inference.yaml").write_text(pyyaml.safe_dump(inference))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(inference))
    weights = write_tiny_model(root / "models", "model.pt")
    if ts:
        from monai.data import save_net_with_metadata
        from monai.networks.nets import DenseNet

        net = DenseNet(**{**TINY_NETWORK_ARGS, "block_config": tuple(TINY_NETWORK_ARGS["block_config"])})
        net.load_state_dict(torch.load(weights, weights_only=True))
        save_net_with_metadata(torch.jit.script(net.eval()), str(root / "models" / "model"), include_config_vals=False,
                               meta_values={"name": "tiny"})
        assert (root / "models" / "model.ts").is_file()
    if not pt:
        weights.unlink()
    return root


@pytest.fixture
def scan(tmp_path):
    """An oblique L-P-I scan (every axis flipped) with anisotropic voxels, as a NIfTI file."""
    affine = oblique_lpi_affine()
    image, _ = planted_scan((30, 26, 12), affine, centre_mm=(50.0, -45.0, 30.0))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def _saved_state(bundle_dir: Path) -> dict:
    return torch.load(bundle_dir / "models" / "model.pt", weights_only=True)


def _assert_same_parameters(model: torch.nn.Module, state: dict) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key].cpu(), value), key


# ----------------------------------------------------------------------------- network and weights

@pytest.mark.parametrize("yaml", [False, True], ids=["json", "yaml"])
def test_bundle_network_has_the_saved_weights(tmp_path, yaml):
    root = write_bundle(tmp_path / "bundle", yaml=yaml)
    bundle = load_bundle(root, trust=True)
    assert isinstance(bundle, Bundle) and type(bundle.network).__name__ == "DenseNet"
    assert not bundle.network.training and not bundle.torchscript and not bundle.random_weights
    assert bundle.weights == root / "models" / "model.pt"
    assert bundle.config_file.name == ("inference.yaml" if yaml else "inference.json")
    assert bundle.class_names == ("bright", "dark") and bundle.metadata["name"] == "tiny test bundle"
    _assert_same_parameters(bundle.network, _saved_state(root))
    # the same through a medcam3d config, as the CLI reads it
    (tmp_path / "run.yaml").write_text("model: {bundle: bundle}\n")
    from medcam3d.config import load_config

    config = load_config(tmp_path / "run.yaml")
    assert config.model.bundle == root
    _assert_same_parameters(load_model(config, trust=True), _saved_state(root))


def test_bundles_need_trust_and_run_no_code_without_it(tmp_path):
    marker = tmp_path / "marker"
    payload = {**TINY_DEF, "growth_rate": f"$open({str(marker)!r}, 'w').close() or 4"}
    root = write_bundle(tmp_path / "bundle", network_def=payload)
    config = parse_config({"model": {"bundle": str(root)}}, source=tmp_path / "run.yaml")
    for attempt in (lambda: load_model(config), lambda: load_bundle(root), lambda: bundle_preprocessing(root)):
        with pytest.raises(UntrustedModelError, match="--trust"):
            attempt()
    assert not marker.exists()
    load_bundle(root, trust=True)
    assert marker.exists()  # the payload is real: trust runs the bundle's expressions


def test_torchscript_only_bundle_fills_network_def_with_its_weights(tmp_path):
    root = write_bundle(tmp_path / "bundle", pt=False, ts=True)
    reference = write_tiny_model(tmp_path)
    bundle = load_bundle(root, trust=True)
    assert type(bundle.network).__name__ == "DenseNet" and not bundle.torchscript
    assert bundle.weights == root / "models" / "model.ts"
    _assert_same_parameters(bundle.network, torch.load(reference, weights_only=True))
    x = torch.randn(2, 1, *SIZE)
    scripted = torch.jit.load(str(root / "models" / "model.ts"))
    with torch.no_grad():
        assert torch.equal(bundle.network(x), scripted(x))


def test_torchscript_only_bundle_without_a_fitting_network_def_is_the_scripted_module(tmp_path, caplog):
    x = torch.randn(1, 1, *SIZE)
    root = write_bundle(tmp_path / "none", pt=False, ts=True, network_def=None)
    bundle = load_bundle(root, trust=True)
    assert bundle.torchscript and isinstance(bundle.network, torch.jit.ScriptModule)
    scripted = torch.jit.load(str(root / "models" / "model.ts"))
    with torch.no_grad():
        assert torch.equal(bundle.network(x), scripted(x))
    other = write_bundle(tmp_path / "other", pt=False, ts=True, network_def={**TINY_DEF, "out_channels": 3})
    with caplog.at_level(logging.WARNING, logger="medcam3d.models"):
        bundle = load_bundle(other, trust=True)
    assert bundle.torchscript and isinstance(bundle.network, torch.jit.ScriptModule)
    assert "do not fit DenseNet" in caplog.text and "TorchScript module itself" in caplog.text


def test_weights_that_do_not_fit_network_def_are_refused(tmp_path):
    root = write_bundle(tmp_path / "bundle", network_def={**TINY_DEF, "out_channels": 3})
    with pytest.raises(Exception, match="do not fit DenseNet.*network_def"):
        load_bundle(root, trust=True)


def test_bundle_without_weights_is_refused_unless_random_weights(tmp_path):
    root = write_bundle(tmp_path / "bundle", pt=False)
    with pytest.raises(ConfigError, match="no models/model.pt or models/model.ts.*random parameters.*random-weights"):
        load_bundle(root, trust=True)
    first = load_bundle(root, trust=True, random_weights=True)
    second = load_bundle(root, trust=True, random_weights=True)
    assert first.random_weights and first.weights is None
    _assert_same_parameters(second.network, first.network.state_dict())  # seeded: the same on every run
    # with weights in the bundle, random_weights leaves them out
    trained = write_bundle(tmp_path / "trained")
    state = {key: value + 1 if value.is_floating_point() else value for key, value in _saved_state(trained).items()}
    torch.save(state, trained / "models" / "model.pt")
    _assert_same_parameters(load_bundle(trained, trust=True).network, state)
    ignored = load_bundle(trained, trust=True, random_weights=True)
    assert ignored.weights is None and ignored.random_weights
    _assert_same_parameters(ignored.network, first.network.state_dict())


def test_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no configs/inference.json or .yaml"):
        load_bundle(tmp_path / "empty", trust=True)
    with pytest.raises(ConfigError, match="model.weights is not used with model.bundle"):
        parse_config({"model": {"bundle": str(tmp_path / "empty"), "weights": "w.pt"}})


def test_layers_takes_the_input_shape_from_the_bundle_metadata(tmp_path, capsys):
    from medcam3d.cli import main
    from medcam3d.models import bundle_input_shape

    write_bundle(tmp_path / "bundle")
    (tmp_path / "run.yaml").write_text("model: {bundle: bundle}\n")
    assert main(["layers", "--config", str(tmp_path / "run.yaml"), "--trust"]) == 0  # no --shape needed
    out = capsys.readouterr().out
    assert "input (1, 16, 16, 16)" in out and "layer='auto' selects: class_layers.relu" in out
    # a bundle without weights is listed too (the layers do not depend on them)
    write_bundle(tmp_path / "empty", pt=False)
    (tmp_path / "empty.yaml").write_text("model: {bundle: empty}\n")
    assert main(["layers", "--config", str(tmp_path / "empty.yaml"), "--trust", "--shape", "1", "24", "24", "24"]) == 0
    assert "input (1, 24, 24, 24)" in capsys.readouterr().out
    assert bundle_input_shape({"network_data_format": {"inputs": {"image": {"num_channels": 4, "spatial_shape": [96, "96", 64]}}}}) == (4, 96, 96, 64)
    assert bundle_input_shape({"network_data_format": {"inputs": {"image": {"spatial_shape": ["16*n", "16*n", "16*n"]}}}}) is None
    assert bundle_input_shape({}) is None


SCRIPTS_NET = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3, 4)))
"""


def test_bundle_with_its_own_scripts_package_loads_without_pythonpath(tmp_path, monkeypatch):
    """network_def: scripts.net.TinyNet, as many bundles have: the bundle root is on sys.path while it loads."""
    import sys

    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        monkeypatch.delitem(sys.modules, name)  # e.g. a `scripts` folder of the current directory
    root = write_bundle(tmp_path / "bundle", network_def={"_target_": "scripts.net.TinyNet", "channels": 4})
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "net.py").write_text(SCRIPTS_NET)
    torch.manual_seed(3)
    state = {"features.0.weight": torch.randn(4, 1, 3, 3, 3), "features.0.bias": torch.randn(4),
             "head.weight": torch.randn(2, 4), "head.bias": torch.randn(2)}
    torch.save(state, root / "models" / "model.pt")
    path = list(sys.path)
    try:
        bundle = load_bundle(root, trust=True)
        assert type(bundle.network).__name__ == "TinyNet"
        _assert_same_parameters(bundle.network, state)
        assert sys.path == path  # the bundle root is not left on the path
        assert bundle.network(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2)
    finally:
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
    with pytest.raises(UntrustedModelError):  # its code is imported only under trust
        load_bundle(root)


# ----------------------------------------------------------------------------- preprocessing

def test_bundle_preprocessing_equals_medcam3d_preprocess(tmp_path, scan):
    root = write_bundle(tmp_path / "bundle")
    pipeline = bundle_preprocessing(root, trust=True)
    assert isinstance(pipeline, BundlePreprocessing) and pipeline.key == "image"
    x, scanner_space = pipeline(scan)
    expected, expected_space = preprocess(scan, MEDCAM3D_STEPS)
    assert type(x).__name__ == "MetaTensor" and x.dtype == torch.float32 and tuple(x.shape) == (1, *SIZE)
    assert torch.equal(x.as_tensor(), expected.as_tensor())
    assert torch.equal(x.affine, expected.affine)
    default, _ = preprocess(scan, [{k: v for k, v in step.items() if k != "dtype"} for step in MEDCAM3D_STEPS])
    torch.testing.assert_close(default.as_tensor(), x.as_tensor(), rtol=0, atol=1e-5)  # float32 resampling
    assert scanner_space == expected_space and scanner_space.shape == (30, 26, 12)
    # load_bundle builds the same chain, and the network takes its output
    bundle = load_bundle(root, trust=True)
    y, _ = bundle.preprocessing(scan)
    assert torch.equal(y.as_tensor(), x.as_tensor())
    with torch.no_grad():
        assert bundle.network(y[None]).shape == (1, 2)


def test_bundle_input_key_comes_from_its_loader_and_metadata(tmp_path, scan):
    steps = [{**step, "keys": ["label", "img"], "allow_missing_keys": True} for step in BUNDLE_STEPS]
    root = write_bundle(tmp_path / "bundle", steps=steps)
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"] = {"img": metadata["network_data_format"]["inputs"]["image"]}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    pipeline = bundle_preprocessing(root, trust=True)
    assert pipeline.key == "img"
    x, _ = pipeline(scan)
    assert torch.equal(x.as_tensor(), preprocess(scan, MEDCAM3D_STEPS)[0].as_tensor())


def test_closest_canonical_loading_is_not_mistaken_for_a_misplacement(tmp_path, scan):
    steps = [{**BUNDLE_STEPS[0], "as_closest_canonical": True}, *BUNDLE_STEPS[1:]]
    root = write_bundle(tmp_path / "bundle", steps=steps)
    x, _ = bundle_preprocessing(root, trust=True)(scan)
    assert torch.allclose(x.affine, preprocess(scan, MEDCAM3D_STEPS)[0].affine)


def test_a_reader_that_places_the_scan_elsewhere_is_refused(tmp_path, scan):
    shift = {"_target_": "Lambdad", "keys": "@image_key",
             "func": "$lambda x: (x.meta.__setitem__('original_affine', np.dot(x.meta['original_affine'], np.diag([2.0, 1, 1, 1]))), x)[1]"}
    root = write_bundle(tmp_path / "bundle", steps=[*BUNDLE_STEPS[:2], shift, *BUNDLE_STEPS[2:]],
                        extra={"imports": ["$import torch", "$import numpy as np"]})
    with pytest.raises(PreprocessingError, match="(?s)placed .*scan.nii.gz.* medcam3d reads it"):
        bundle_preprocessing(root, trust=True)(scan)


def test_bundle_preprocessing_errors(tmp_path, scan):
    root = write_bundle(tmp_path / "noload", steps=BUNDLE_STEPS[1:])
    with pytest.raises(PreprocessingError, match="no LoadImaged"):
        bundle_preprocessing(root, trust=True)
    crops = {"_target_": "RandSpatialCropSamplesd", "keys": "@image_key", "roi_size": [8, 8, 8], "num_samples": 2}
    root = write_bundle(tmp_path / "crops", steps=[*BUNDLE_STEPS, crops])
    with pytest.raises(PreprocessingError, match="returned 2 samples"):
        bundle_preprocessing(root, trust=True)(scan)
    root = write_bundle(tmp_path / "plain", steps=[*BUNDLE_STEPS, {"_target_": "ToNumpyd", "keys": "@image_key"}])
    with pytest.raises(PreprocessingError, match="not a MONAI MetaTensor"):
        bundle_preprocessing(root, trust=True)(scan)
    root = write_bundle(tmp_path / "fine")
    pipeline = bundle_preprocessing(root, trust=True)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 10), np.float32), np.eye(4)), flat)
    with pytest.raises(PreprocessingError, match="inference.json: preprocessing failed on .*flat.nii.gz"):
        pipeline(flat)


def test_bundle_preprocessing_checks_the_header_before_monai_reads_it(tmp_path):
    import SimpleITK as sitk

    from medcam3d.io import UntrustedFileError
    from _images import write_dicom_series

    pipeline = bundle_preprocessing(write_bundle(tmp_path / "bundle"), trust=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.raw").write_bytes(bytes(8 * 8 * 8))
    (tmp_path / "scans").mkdir()
    header = tmp_path / "scans" / "evil.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
                      "ElementDataFile = ../elsewhere/secret.raw\n")
    with pytest.raises(UntrustedFileError, match="leads out of the header's folder"):
        pipeline(header)
    image = sitk.Image([4, 5, 6], sitk.sitkInt16)
    write_dicom_series(image, tmp_path / "dicom")
    write_dicom_series(image, tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.8.498.9")
    with pytest.raises(ImageReadError, match="2 DICOM series .*one series per folder"):
        pipeline(tmp_path / "dicom")
    write_dicom_series(image, tmp_path / "gap")
    (tmp_path / "gap" / "1_slice002.dcm").unlink()
    with pytest.raises(GeometryError, match="1 missing slice"):
        pipeline(tmp_path / "gap")


def test_explainer_preprocesses_with_the_bundles_own_chain_as_the_cli_does(tmp_path, scan):
    from medcam3d import Explainer
    from medcam3d.errors import InputError

    root = write_bundle(tmp_path / "bundle")
    (tmp_path / "run.yaml").write_text("model: {bundle: bundle}\n")
    expected, expected_space = bundle_preprocessing(root, trust=True)(scan)
    assert tuple(expected.shape) == (1, *SIZE)  # not the default transforms' (1, 30, 26, 12)
    explainer = Explainer.from_config(tmp_path / "run.yaml", trust=True)
    assert explainer.class_names == ["bright", "dark"]
    x, scanner_space = explainer.preprocess(scan)
    assert torch.equal(x.as_tensor(), expected.as_tensor()) and torch.equal(x.affine, expected.affine)
    assert scanner_space == expected_space
    with pytest.raises(InputError, match="volume cannot be used with a bundle's own preprocessing"):
        explainer.preprocess(scan, volume=0)
    # a model given by hand: the chain is read from the bundle on first use (its configs run code: trust)
    given = Explainer.from_config(tmp_path / "run.yaml", model=load_bundle(root, trust=True).network)
    with pytest.raises(UntrustedModelError):
        given.preprocess(scan)
    y, _ = given.preprocess(scan, trust=True)
    assert torch.equal(y.as_tensor(), expected.as_tensor())
    # the config's own preprocessing list overrides the bundle's
    (tmp_path / "own.yaml").write_text("model: {bundle: bundle}\npreprocessing: [{name: Orientation, axcodes: RAS}]\n")
    own, _ = Explainer.from_config(tmp_path / "own.yaml", trust=True).preprocess(scan)
    assert tuple(own.shape) == (1, 30, 26, 12)


def test_one_loader_for_the_cli_the_explainer_and_napari(tmp_path, monkeypatch):
    import argparse

    import medcam3d.models
    from medcam3d import Explainer
    from medcam3d.cli.runner import build_runner
    from medcam3d.config import load_config
    from medcam3d.models import ConfiguredModel, load_configured

    root = write_bundle(tmp_path / "bundle")
    (tmp_path / "run.yaml").write_text("model: {bundle: bundle}\n")
    (tmp_path / "own.yaml").write_text("model: {bundle: bundle}\nclass_names: [a, b]\n"
                                       "preprocessing: [{name: Orientation, axcodes: RAS}]\n")
    loaded = load_configured(load_config(tmp_path / "run.yaml"), trust=True)
    assert isinstance(loaded, ConfiguredModel) and not loaded.random_weights
    assert loaded.config.class_names == ["bright", "dark"] and isinstance(loaded.preprocessing, BundlePreprocessing)
    _assert_same_parameters(loaded.model, _saved_state(root))
    own = load_configured(load_config(tmp_path / "own.yaml"), trust=True)
    assert own.config.class_names == ["a", "b"] and own.preprocessing is None  # the config's own win
    assert load_configured(load_config(tmp_path / "run.yaml"), trust=True, random_weights=True).random_weights
    with pytest.raises(UntrustedModelError):
        load_configured(load_config(tmp_path / "run.yaml"))
    # the CLI, Explainer.from_config and napari's loader all read the model through it
    calls = []

    def spy(config, **kwargs):
        calls.append(config.source)
        return load_configured(config, **kwargs)

    monkeypatch.setattr(medcam3d.models, "load_configured", spy)
    assert Explainer.from_config(tmp_path / "run.yaml", trust=True).class_names == ["bright", "dark"]
    runner = build_runner(argparse.Namespace(config=str(tmp_path / "run.yaml"), trust=True))
    assert runner.reader is not None and runner.config.class_names == ["bright", "dark"]
    service = pytest.importorskip("medcam3d.napari._service")
    config, _ = service.load_explainable(tmp_path / "run.yaml", trust=True)
    assert config.class_names == ["bright", "dark"]
    assert calls == [tmp_path / "run.yaml"] * 3
