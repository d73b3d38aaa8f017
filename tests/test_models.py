"""medcam3d.models: no silent random weights, and 2D/3D rank checks before preprocessing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from medcam3d.config import ModelConfig, load_config, parse_config
from medcam3d.errors import ConfigError
from medcam3d.errors import InputError
from medcam3d.models import check_input_rank, load_model
from conftest import TINY_NETWORK, TINY_NETWORK_ARGS, write_tiny_model

TINY = {"network": TINY_NETWORK, "args": TINY_NETWORK_ARGS}
MISSING = (
    "model.weights is missing: a network without weights has random parameters; give the trained weights, or "
    "`weights: none` to explain a randomly initialised network on purpose (e.g. for a sanity check)"
)


def _state_equal(a: nn.Module, b: dict) -> bool:
    own = a.state_dict()
    return set(own) == set(b) and all(torch.equal(own[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- random weights

def test_a_network_without_weights_is_refused_with_file_and_key(tmp_path):
    path = tmp_path / "template.yaml"
    path.write_text(f"model: {{network: {TINY_NETWORK}, args: {{spatial_dims: 3, in_channels: 1, out_channels: 2}}}}\n")
    config = load_config(path)  # parsing is fine: the refusal comes when the model is loaded
    assert config.model.weights is None and not config.model.random_weights
    with pytest.raises(ConfigError) as info:
        load_model(config)
    assert str(info.value) == f"{path}: {MISSING}."
    with pytest.raises(ConfigError, match=f"^config: {MISSING.split(':')[0]}"):
        load_model(ModelConfig(network=TINY_NETWORK, args=TINY_NETWORK_ARGS))  # the Python API too
    # an empty `weights:` (YAML null) is a placeholder left blank, not a decision
    path.write_text(f"model: {{network: {TINY_NETWORK}, weights: null, args: {{spatial_dims: 3, in_channels: 1, out_channels: 2}}}}\n")
    with pytest.raises(ConfigError, match="model.weights is missing"):
        load_model(load_config(path))


@pytest.mark.parametrize("written", ["none", "None", "NONE", " none "])
def test_weights_none_explains_random_weights_on_purpose(tmp_path, written):
    path = tmp_path / "random.yaml"
    path.write_text(f"model: {{network: {TINY_NETWORK}, weights: '{written}', args: {{spatial_dims: 3, in_channels: 1, out_channels: 2}}}}\n")
    config = load_config(path)
    assert config.model.random_weights and config.model.weights is None
    model = load_model(config)
    assert not model.training
    # the same random parameters on every run, and the global random state is left alone
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = load_model(config)
    assert torch.equal(torch.rand(3), before)
    assert _state_equal(again, model.state_dict())


def test_random_weights_argument_accepts_a_missing_file_and_ignores_a_given_one(tmp_path, caplog):
    weights = write_tiny_model(tmp_path)
    saved = torch.load(weights, weights_only=True)
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}
    torch.save(shifted, weights)
    config = parse_config({"model": {**TINY, "weights": str(weights)}}, source=tmp_path / "run.yaml")
    assert _state_equal(load_model(config), shifted)
    with caplog.at_level(logging.WARNING, logger="medcam3d.models"):
        random = load_model(config, random_weights=True)
    assert not _state_equal(random, shifted) and "is not loaded" in caplog.text
    without = parse_config({"model": dict(TINY)}, source=tmp_path / "run.yaml")
    assert _state_equal(load_model(without, random_weights=True), random.state_dict())


def test_torchscript_and_bundles_take_no_args_or_weights(tmp_path):
    (tmp_path / "model.ts").write_bytes(b"")
    (tmp_path / "bundle").mkdir()
    with pytest.raises(ConfigError, match="model.args is not used with model.torchscript"):
        parse_config({"model": {"torchscript": "model.ts", "args": {"x": 1}}}, source=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="model.weights is not used with model.bundle"):
        parse_config({"model": {"bundle": "bundle", "weights": "none"}}, source=tmp_path / "c.yaml")
    scripted = tmp_path / "scripted.ts"
    torch.jit.save(torch.jit.script(nn.Conv3d(1, 1, 1)), scripted)
    with pytest.raises(ConfigError, match="cannot be re-initialised at random"):
        load_model(ModelConfig(torchscript=scripted), trust=True, random_weights=True)


# ----------------------------------------------------------------------------- input rank

def _net(conv: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Identity(), conv(1, 2, 3), nn.ReLU())


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_check_input_rank(scripted):
    net3d, net2d = _net(nn.Conv3d), _net(nn.Conv2d)
    if scripted:  # TorchScript modules have no nn.Conv3d instances, only their original names
        net3d, net2d = torch.jit.script(net3d), torch.jit.script(net2d)
    assert check_input_rank((30, 26, 12), net3d) == 3
    assert check_input_rank((64, 48), net2d) == 2
    with pytest.raises(InputError, match=r"'scan.nii.gz' is a 2D image \(shape \(64, 48\)\); the model takes 3D volumes"):
        check_input_rank((64, 48), net3d, path="scan.nii.gz")
    with pytest.raises(InputError, match=r"is a single slice \(shape \(64, 48, 1\): one voxel along axis k\).*takes 3D volumes"):
        check_input_rank((64, 48, 1), net3d, path=Path("slice.nii.gz"))
    with pytest.raises(InputError, match=r"is a 3D volume \(shape \(30, 26, 12\)\); the model takes 2D images"):
        check_input_rank((30, 26, 12), net2d)
    with pytest.raises(InputError, match=r"one slice stored as a volume .*Save the slice as a 2D image"):
        check_input_rank((64, 48, 1), net2d)
    with pytest.raises(InputError, match="for a 4D file pick one volume first"):
        check_input_rank((30, 26, 12, 4), net3d)


def test_check_input_rank_of_networks_without_convolutions_and_of_monai_networks():
    from monai.networks.nets import DenseNet121, UNet

    assert check_input_rank((5, 5, 5), nn.Sequential(nn.Flatten(), nn.Linear(125, 2))) is None
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    assert check_input_rank((32, 32), unet) == 2
    with pytest.raises(InputError, match="takes 2D images"):
        check_input_rank((32, 32, 8), unet)
    with pytest.raises(InputError, match="takes 3D volumes"):
        check_input_rank((32, 32), DenseNet121(spatial_dims=3, in_channels=1, out_channels=2))
