"""A config cannot run code without --trust: networks, their arguments, transforms, and the YAML itself.

Every code-execution payload here would create a marker file in ``tmp_path``; the tests assert that
it never appears. Hostile and garbage configs may only raise medcam3d errors.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from medcam3d import models
from medcam3d.cli import main
from medcam3d.config import ModelConfig, PreprocessingSteps, load_config, parse_config, plain_data_problem
from medcam3d.errors import (
    ConfigError,
    InputError,
    Medcam3dError,
    ModelLoadError,
    PreprocessingError,
    UntrustedConfigError,
    UntrustedModelError,
    UntrustedNetworkError,
    UntrustedTransformError,
)
from medcam3d.models import build_network, load_model
from medcam3d.preprocess import SAFE_TRANSFORMS, build_transforms, preprocess
from medcam3d.preprocess_grid import MAX_VOXELS
from medcam3d.space import Space

ROOT = Path(__file__).parent.parent
TINY = "{spatial_dims: 3, in_channels: 1, out_channels: 2, init_features: 4, growth_rate: 4, block_config: [1, 1]}"
TINY_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4, "growth_rate": 4, "block_config": [1, 1]}


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _image() -> tuple[np.ndarray, Space]:
    return np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8), Space((8, 8, 8), np.eye(4))


def _payloads(marker: Path) -> dict[str, tuple[str, str]]:
    """Networks (and args) that each created ``marker`` before configs were constrained."""
    shell = ["sh", "-c", f"touch {marker}"]
    pth = marker.parent / "site-packages" / "evil.pth"
    return {
        "monai_run_cmd": ("monai.utils.misc.run_cmd", f"{{cmd_list: {shell}}}"),
        "monai_instantiate": ("monai.utils.module.instantiate", f"{{__path: os.system, __mode: default, command: 'touch {marker}'}}"),
        "medcam3d_atomic_write": ("medcam3d._files.atomic_write_text", f"{{path: '{pth}', text: 'import os; os.system(\"touch {marker}\")'}}"),
        "os_system": ("os.system", f"{{command: 'touch {marker}'}}"),
        "torch_nn_function": ("torch.nn.modules.module.register_module_forward_hook", "{hook: print}"),
        "monai_nets_function": ("monai.networks.nets.efficientnet.get_efficientnet_image_size", "{model_name: efficientnet-b0}"),
    }


# ----------------------------------------------------------------------------- model.network
@pytest.mark.parametrize("payload", list(_payloads(Path("/m"))))
def test_code_execution_through_model_network_is_refused(tmp_path, payload):
    marker = tmp_path / "marker"
    (tmp_path / "site-packages").mkdir()
    network, args = _payloads(marker)[payload]
    path = _write(tmp_path, f"model: {{network: {network}, args: {args}}}\n")
    config = load_config(path)
    with pytest.raises(UntrustedNetworkError) as info:
        load_model(config)
    message = str(info.value)
    assert str(path) in message and "model.network" in message and "--trust" in message
    assert isinstance(info.value, UntrustedModelError) and isinstance(info.value, UntrustedConfigError)
    assert not marker.exists()
    assert not (tmp_path / "site-packages" / "evil.pth").exists()


def test_trust_keeps_building_any_importable_callable(tmp_path):
    # The same payload runs with trust: proof that it is a real payload, and that --trust keeps the old behaviour.
    marker = tmp_path / "marker"
    network, args = _payloads(marker)["monai_run_cmd"]
    config = load_config(_write(tmp_path, f"model: {{network: {network}, args: {args}}}\n"))
    with pytest.raises(ModelLoadError, match="did not build a torch.nn.Module"):
        load_model(config, trust=True)
    assert marker.exists()


def test_cli_refuses_a_code_execution_config(tmp_path, capsys):
    marker = tmp_path / "marker"
    network, args = _payloads(marker)["monai_run_cmd"]
    path = _write(tmp_path, f"model: {{network: {network}, args: {args}}}\n")
    assert main(["layers", "--config", str(path), "--shape", "1", "8", "8", "8"]) != 0
    err = capsys.readouterr().err
    assert "--trust" in err and "model.network" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "network, reason",
    [
        ("torch.nn.init.zeros_", "not a class"),
        ("monai.networks.nets.get_efficientnet_image_size", "not a class"),
        ("monai.networks.nets.BlockArgs", "not a torch.nn.Module"),
        ("torch.nn.Parameter", "not a torch.nn.Module"),
        ("monai.networks.blocks.Convolution", "outside the network namespaces"),
        ("monai.bundle.ConfigParser", "outside the network namespaces"),
        ("medcam3d.layers.resolve_layer", "outside the network namespaces"),
        ("builtins.eval", "outside the network namespaces"),
        ("monai.networks.nets.Transchex", "downloads or picks third-party models"),
        ("monai.networks.nets.TorchVisionFCModel", "downloads or picks third-party models"),
    ],
)
def test_network_must_be_a_module_class_from_the_namespaces(network, reason):
    with pytest.raises(UntrustedNetworkError, match=reason):
        build_network(network, {})


def test_class_re_exported_into_a_namespace_from_elsewhere_is_refused(monkeypatch):
    import monai.networks.nets as nets
    from monai.networks.blocks import Convolution

    monkeypatch.setattr(nets, "Imported", Convolution, raising=False)
    with pytest.raises(UntrustedNetworkError, match="defined in 'monai.networks.blocks.convolutions', outside"):
        build_network("monai.networks.nets.Imported", {"spatial_dims": 3, "in_channels": 1, "out_channels": 1})


@pytest.mark.parametrize(
    "network, args, kind",
    [
        ("monai.networks.nets.DenseNet", dict(TINY_ARGS, act=["relu", {"inplace": True}], norm="batch"), "DenseNet"),
        ("monai.networks.nets.densenet.DenseNet", TINY_ARGS, "DenseNet"),
        ("monai.networks.nets.densenet121", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}, "DenseNet121"),
        ("monai.networks.nets.resnet10", {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 2}, "ResNet"),
        ("monai.networks.nets.EfficientNetBN", {"model_name": "efficientnet-b0", "spatial_dims": 3, "in_channels": 1, "num_classes": 2, "pretrained": False}, "EfficientNetBN"),
        ("torch.nn.Conv3d", {"in_channels": 1, "out_channels": 2, "kernel_size": 3}, "Conv3d"),
        ("torch.nn.modules.conv.Conv3d", {"in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3]}, "Conv3d"),
        ("torch.nn.Sequential", {}, "Sequential"),
    ],
)
def test_network_classes_with_plain_arguments_build_without_trust(network, args, kind):
    model = build_network(network, args)
    assert type(model).__name__ == kind
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sequential_gets_no_modules_from_a_config():
    # Sequential's constructor takes modules, which plain data cannot give: only the empty container builds.
    with pytest.raises(ModelLoadError, match="cannot build torch.nn.Sequential"):
        build_network("torch.nn.Sequential", {"layers": [{"name": "Conv3d"}]})


# ----------------------------------------------------------------------------- model.args
@pytest.mark.parametrize(
    "act, key",
    [
        ("'$__import__(\"os\").system(\"touch MARKER\")'", "model.args.act"),
        ("'@other#entry'", "model.args.act"),
        ("'%other.yaml#net'", "model.args.act"),
        ("{_target_: os.system, command: 'touch MARKER'}", "model.args.act._target_"),
        ("{__path: os.system, command: 'touch MARKER'}", "model.args.act.__path"),
        ("[relu, {_requires_: '$import os'}]", "model.args.act[1]._requires_"),
        ("[relu, {_disabled_: false}]", "model.args.act[1]._disabled_"),
        ("[relu, {_mode_: callable}]", "model.args.act[1]._mode_"),
        ("[relu, {_desc_: x}]", "model.args.act[1]._desc_"),
        ("[relu, {'$inplace': true}]", "model.args.act[1].$inplace"),
    ],
)
def test_network_arguments_must_be_plain_data(tmp_path, act, key):
    marker = tmp_path / "marker"
    text = f"model: {{network: monai.networks.nets.DenseNet, args: {{spatial_dims: 3, in_channels: 1, out_channels: 2, act: {act}}}}}\n"
    path = _write(tmp_path, text.replace("MARKER", str(marker)))
    with pytest.raises(UntrustedNetworkError) as info:
        load_model(load_config(path))
    message = str(info.value)
    assert f"{path}: {key}:" in message and "--trust" in message and "plain data" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, key",
    [
        ({"a": 1, "b": [1.5, "x", None, True, {"c": (1, 2)}]}, None),
        ({"act": "$x"}, "model.args.act"),
        ({"a": [1, {"@b": 1}]}, "model.args.a[1].@b"),
        ({"a": b"bytes"}, "model.args.a"),
        ({"a": {1, 2}}, "model.args.a"),
        ({"a": print}, "model.args.a"),
        ({"a": nn.ReLU}, "model.args.a"),
        ({"a": {3: "x"}}, "model.args.a"),
    ],
)
def test_plain_data_problem_names_the_innermost_key(value, key):
    problem = plain_data_problem(value, "model.args")
    assert (problem is None) if key is None else (problem[0] == key)


def test_plain_data_problem_refuses_self_containing_and_deep_values():
    loop: list = []
    loop.append(loop)
    assert "contains itself" in plain_data_problem(loop, "x")[1]
    deep: list = []
    for _ in range(200):
        deep = [deep]
    assert "levels deep" in plain_data_problem(deep, "x")[1]


@pytest.mark.parametrize(
    "network, args",
    [
        ("monai.networks.nets.DenseNet121", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "pretrained": True}),
        ("monai.networks.nets.resnet10", {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 2, "pretrained": "/tmp/weights.pth"}),
        ("monai.networks.nets.HoVerNet", {"pretrained_url": "http://example.invalid/evil.pth"}),
    ],
)
def test_arguments_that_download_or_read_weights_need_trust(network, args):
    key = next(k for k in args if k.startswith("pretrained"))
    with pytest.raises(UntrustedNetworkError, match=f"model.args.{key}: .*download or read weights"):
        build_network(network, args)


@pytest.mark.parametrize(
    "args, text",
    [
        ({"spatial_dims": 4, "in_channels": 1, "out_channels": 2}, "IndexError"),
        ({"spatial_dims": "three", "in_channels": 1, "out_channels": 2}, "cannot build"),
        ({"spatial_dims": 3, "in_channels": 1.5, "out_channels": 2}, "cannot build"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": -2}, "cannot build"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "no_such": 1}, "no_such"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": [[]]}, "cannot build"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": float("nan")}, "cannot build"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": 10**12}, "larger than"),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "block_config": [10**9]}, "model.args.block_config\\[0\\]"),
    ],
)
def test_bad_network_arguments_are_model_load_errors(args, text):
    with pytest.raises(ModelLoadError, match=text):
        build_network("monai.networks.nets.DenseNet121" if "block_config" not in args else "monai.networks.nets.DenseNet", args)


def _registration_hooks() -> list[int]:
    """How many process-wide module registration hooks torch holds (parameters, buffers, submodules)."""
    from torch.nn.modules import module

    return [len(module._global_parameter_registration_hooks), len(module._global_buffer_registration_hooks),
            len(module._global_module_registration_hooks)]


def test_too_large_networks_are_stopped_before_they_are_allocated(monkeypatch):
    from medcam3d.models import budget

    before = _registration_hooks()
    with pytest.raises(ModelLoadError, match="more than 1,000 parameters and buffers"):
        build_network("monai.networks.nets.DenseNet", TINY_ARGS, max_parameters=1000)
    assert _registration_hooks() == before  # the build budget's hooks are removed after a stopped build
    monkeypatch.setattr(budget, "MAX_MODULES", 5)
    with pytest.raises(ModelLoadError, match="more than 5 submodules"):
        build_network("monai.networks.nets.DenseNet", TINY_ARGS)
    monkeypatch.setattr(budget, "MAX_MODULES", 50_000)
    monkeypatch.setattr(budget, "MAX_BUILD_SECONDS", -1.0)
    with pytest.raises(ModelLoadError, match="s of construction"):
        build_network("monai.networks.nets.DenseNet", TINY_ARGS)
    monkeypatch.setattr(budget, "MAX_BUILD_SECONDS", 60.0)
    assert isinstance(build_network("monai.networks.nets.DenseNet", TINY_ARGS, trust=True, max_parameters=1000), nn.Module)
    assert _registration_hooks() == before


def test_the_build_budget_hooks_exist_only_while_a_build_runs():
    from medcam3d.models.budget import build_budget

    before = _registration_hooks()
    seen = []
    with build_budget(10_000) as outer:
        seen.append(_registration_hooks())
        with build_budget(10_000):  # a nested (or concurrent) build shares the hooks
            seen.append(_registration_hooks())
        seen.append(_registration_hooks())
        nn.Conv3d(1, 2, 3)
    assert seen == [[n + 1 for n in before]] * 3 and outer.elements == 2 * 27 + 2 and outer.modules == 0
    assert _registration_hooks() == before
    with pytest.raises(RuntimeError, match="inside"):
        with build_budget(10_000):
            raise RuntimeError("inside")
    assert _registration_hooks() == before  # removed when the build fails too
    assert isinstance(build_network("monai.networks.nets.DenseNet", TINY_ARGS), nn.Module)  # untrusted: under a budget
    assert _registration_hooks() == before


def test_networks_that_cannot_be_built_on_the_meta_device_are_counted_on_the_cpu():
    # SwinUNETR reads tensor values in its constructor, which the meta device cannot do.
    args = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    model = build_network("monai.networks.nets.SwinUNETR", args)
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    with pytest.raises(ModelLoadError, match="more than 1,000 parameters and buffers"):
        build_network("monai.networks.nets.SwinUNETR", args, max_parameters=1000)


def test_model_errors_name_the_config_file(tmp_path):
    path = _write(tmp_path, "model: {network: monai.networks.nets.DenseNet121, args: {spatial_dims: 4, in_channels: 1, out_channels: 2}}\n")
    config = load_config(path)
    assert config.model.source == path
    for given in (config, config.model):
        with pytest.raises(ModelLoadError, match=f"{path}: model.args"):
            load_model(given)
    spec = ModelConfig(network="os.system", source=path)
    with pytest.raises(UntrustedNetworkError, match=f"{path}: model.network"):
        load_model(spec)


class _Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_weights_that_are_not_a_regular_file_are_refused_unopened(tmp_path, kind):
    """``weights: /dev/zero``, a FIFO or a folder: named for what it is (was: 'does not exist'), never opened."""
    import os

    target = tmp_path / "w"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target = Path("/dev/zero")
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: {target}}}\n")
    with pytest.raises(ConfigError, match=f"model.weights '{target}' is not a regular file .not a folder, FIFO or device"):
        load_config(path)


def test_weights_that_are_full_pickles_need_trust(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: evil.pt}}\n")
    with pytest.raises(ModelLoadError, match="(?s)weights_only=True.*--trust"):
        load_model(load_config(path))
    assert not marker.exists()
    with pytest.raises(ModelLoadError):  # trusted: unpickled in full (the payload runs), then no state_dict
        load_model(load_config(path), trust=True)
    assert marker.exists()


def test_trust_loads_a_whole_pickled_model(tmp_path):
    torch.manual_seed(0)
    saved = build_network("monai.networks.nets.DenseNet", TINY_ARGS)
    torch.save(saved, tmp_path / "whole.pt")
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: whole.pt}}\n")
    with pytest.raises(ModelLoadError, match="--trust"):
        load_model(load_config(path))
    model = load_model(load_config(path), trust=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


# ----------------------------------------------------------------------------- preprocessing
def test_saveimage_in_preprocessing_is_refused_and_writes_nothing(tmp_path):
    saved = tmp_path / "saved"
    steps = [{"name": "Orientation", "axcodes": "RAS"}, {"name": "SaveImage", "output_dir": str(saved), "output_ext": ".nii.gz"}]
    with pytest.raises(UntrustedTransformError) as info:
        preprocess(_image(), steps)
    assert "preprocessing[1].name" in str(info.value) and "--trust" in str(info.value)
    assert isinstance(info.value, PreprocessingError)
    assert not saved.exists() or not any(saved.rglob("*"))


def test_preprocessing_errors_name_the_config_file_and_entry(tmp_path):
    path = _write(tmp_path, f"""
model: {{network: monai.networks.nets.DenseNet, args: {TINY}}}
preprocessing:
  - {{name: Orientation, axcodes: RAS}}
  - {{name: Spacing, pixdim: [2, 2, 2]}}
  - {{name: SaveImage, output_dir: {tmp_path / 'saved'}}}
""")
    config = load_config(path)
    assert isinstance(config.preprocessing, PreprocessingSteps) and config.preprocessing.source == path
    with pytest.raises(UntrustedTransformError, match=f"{path}: preprocessing\\[2\\].name: SaveImage"):
        build_transforms(config.preprocessing)
    with pytest.raises(UntrustedTransformError, match=f"{path}: preprocessing\\[2\\].name"):
        preprocess(_image(), config.preprocessing)


@pytest.mark.parametrize(
    "step, key",
    [
        ({"name": "Lambda", "func": "$lambda x: __import__('os').system('touch MARKER')"}, "preprocessing[0].func"),
        ({"name": "Lambda", "func": "len"}, "preprocessing[0].name"),
        ({"name": "LoadImage", "reader": "$__import__('os').system('touch MARKER')"}, "preprocessing[0].reader"),
        ({"name": "monai.transforms.SaveImage", "output_dir": "MARKER"}, "preprocessing[0].name"),
        ({"name": "Invert", "transform": "@preprocessing"}, "preprocessing[0].transform"),
        ({"name": "RandFlip", "prob": 1.0}, "preprocessing[0].name"),
        ({"name": "Spacing", "pixdim": {"_target_": "os.system", "command": "touch MARKER"}}, "preprocessing[0].pixdim._target_"),
        ({"name": "Spacing", "pixdim": [2, 2, 2], "mode": "%other.yaml#mode"}, "preprocessing[0].mode"),
        ({"name": "CropForeground", "select_fn": "os.system"}, "preprocessing[0].select_fn"),
        ({"_target_": "CropForeground", "select_fn": lambda x: x > 0}, "preprocessing[0].select_fn"),
    ],
)
def test_transforms_with_io_callables_or_expressions_need_trust(tmp_path, step, key):
    marker = tmp_path / "marker"
    step = {k: (v.replace("MARKER", str(marker)) if isinstance(v, str) else v) for k, v in step.items()}
    with pytest.raises(UntrustedTransformError) as info:
        preprocess(_image(), [step])
    assert f"{key}:" in str(info.value) and "--trust" in str(info.value)
    assert not marker.exists()


def test_trust_unlocks_any_array_transform(tmp_path):
    compose = build_transforms(
        [{"name": "SaveImage", "output_dir": str(tmp_path / "saved")}, {"name": "CropForeground", "select_fn": lambda x: x > 0.5}],
        trust=True,
    )
    assert [type(t).__name__ for t in compose.transforms] == ["SaveImage", "CropForeground"]
    x, _ = preprocess(_image(), [{"name": "CropForeground", "select_fn": lambda x: x > 0.5}], trust=True)
    assert x.shape[1:] != (8, 8, 8)


def test_oversized_outputs_are_refused_before_running():
    with pytest.raises(PreprocessingError, match=r"preprocessing\[0\].spatial_size: .* voxels"):
        build_transforms([{"name": "Resize", "spatial_size": [MAX_VOXELS, 2, 1]}])


def test_safe_transforms_are_array_transforms_and_cover_the_shipped_configs():
    import monai.transforms as mt

    for name in SAFE_TRANSFORMS:
        cls = getattr(mt, name)
        assert inspect.isclass(cls) and issubclass(cls, mt.Transform) and not issubclass(cls, mt.MapTransform), name
        assert not issubclass(cls, mt.Randomizable), name
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert all(step["name"] in SAFE_TRANSFORMS for step in config.preprocessing or []), path
        build_transforms(config.preprocessing)


# ----------------------------------------------------------------------------- the YAML file
def test_non_utf8_config_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {network: monai.networks.nets.DenseNet121}\nclass_names: [Läsion]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "marker"
    text = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, text))
    assert not marker.exists()


def _billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {network: monai.networks.nets.DenseNet, args: {x: &a [1, *a]}}", "anchor is used inside itself"),
        (_billion_laughs() + "\nmodel: {network: monai.networks.nets.DenseNet, args: {x: *l9}}\n", "expands to more than"),
        (_billion_laughs(6) + "\nclass_names: *l6\nmodel: {network: monai.networks.nets.DenseNet}\n", "expands to more than"),
        ("model: " + "[" * 5000 + "]" * 5000, "nested more than"),
        ("class_names: [" + ", ".join(["a"] * 60_000) + "]", "larger than"),
        ("# " + "x" * 200_000, "larger than"),
    ],
)
def test_yaml_bombs_are_refused_quickly(tmp_path, monkeypatch, text, message):
    """Why it is quick: a file over MAX_CONFIG_BYTES is never parsed; otherwise the parser composes at most the
    file's own nodes (not their expansion through aliases, and no deeper than MAX_CONFIG_DEPTH + 1) and nothing
    is ever built from them."""
    from medcam3d.config import MAX_CONFIG_DEPTH

    path = _write(tmp_path, text)
    composed, constructed = [], []
    compose_node = yaml.SafeLoader.compose_node
    monkeypatch.setattr(yaml.SafeLoader, "compose_node",
                        lambda self, *args: composed.append(1) or compose_node(self, *args))

    def construct(self, node):
        constructed.append(node)
        raise AssertionError("the YAML was built into Python values")

    monkeypatch.setattr(yaml.SafeLoader, "construct_document", construct)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert constructed == []
    if message == "larger than":
        assert composed == []
    else:
        assert 0 < len(composed) <= (MAX_CONFIG_DEPTH + 1 if message == "nested more than" else 200), len(composed)


# ----------------------------------------------------------------------------- fuzz
def _hostile_configs(tmp_path: Path, marker: Path) -> list[str]:
    net = "monai.networks.nets.DenseNet"
    return [
        "",
        "null",
        "[]",
        "42",
        "'model'",
        "model: 5",
        "model: []",
        "model: {network: 5}",
        "model: {network: [monai, networks]}",
        "model: {network: '..'}",
        "model: {network: 'monai.networks.nets.'}",
        "model: {network: '.DenseNet'}",
        "model: {network: 'monai.networks.nets.__builtins__'}",
        "model: {network: 'monai.networks.nets._DenseLayer'}",
        "model: {network: 'torch.nn.functional.relu'}",
        "model: {network: 'monai.networks.nets.DenseNet\\x00evil'}",
        f"model: {{network: {net}, args: 7}}",
        f"model: {{network: {net}, args: [1, 2]}}",
        f"model: {{network: {net}, args: {{1: 2}}}}",
        f"model: {{network: {net}, args: {{'not an identifier': 2}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: 99999999999999999999999999999, in_channels: 1, out_channels: 2}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: {'9' * 5000}}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: .inf, in_channels: .nan, out_channels: -.inf}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: !!binary aGVsbG8=}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: !!set {{a, b}}}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: 2001-02-03}}}}",
        f"model: {{network: {net}, args: {{spatial_dims: 2001-13-45}}}}",
        f"model: {{network: {net}, args: {{block_config: [[[[[[]]]]]], spatial_dims: {{a: {{b: {{c: []}}}}}}}}}}",
        f"model: {{network: {net}, args: {TINY}, weights: 5}}",
        f"model: {{network: {net}, args: {TINY}, weights: ''}}",
        f"model: {{network: {net}, args: {TINY}, weights: /dev/zero}}",
        f"model: {{network: {net}, args: {TINY}, weights: {tmp_path}}}",
        f"model: {{network: {net}, args: {TINY}, weights: '~no_such_user_medcam3d/w.pt'}}",
        f"model: {{network: {net}, args: {TINY}, weights: '{'x' * 5000}'}}",
        f"model: {{network: {net}, args: {TINY}, weights: \"w\\0.pt\"}}",
        f"model: {{network: {net}, args: {TINY}, weights: garbage.pt}}",
        f"model: {{bundle: {tmp_path}}}",
        "model: {torchscript: garbage.pt}",
        f"model: {{network: {net}, bundle: {tmp_path}}}",
        f"model: {{network: {net}, args: {TINY}}}\ntask: [1]\nclass_names: {{a: 1}}\ntarget: {{x: 1}}\namp: [bf16]",
        f"model: {{network: {net}, args: {TINY}}}\noutput: {{fill: 1e999999, normalized: yes, four_d: 3}}",
        f"model: {{network: {net}, args: {TINY}}}\noutput: [1]\nsliding_window: {{roi: [true], overlap: .nan, sw_batch: -1}}",
        f"model: {{network: {net}, args: {TINY}}}\nsliding_window: {{roi: [8, 8, 8], sw_batch: 0}}",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: {{name: Spacing}}",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [Spacing, 3, null]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: 3}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Spacing, 3: x}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Spacing, pixdim: [0, -1, .nan]}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Spacing, pixdim: [1, 1, 1], mode: 999}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Resize, spatial_size: [-5, 0, 99999999999999]}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Orientation, axcodes: QQQ}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: ResizeWithPadOrCrop, spatial_size: 'abc'}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: ScaleIntensityRange, a_min: x, a_max: [], b_min: {{}}, b_max: null}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: EnsureType, data_type: numpy}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: CastToType, dtype: object}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: SaveImage, output_dir: '{marker}'}}]",
        f"model: {{network: {net}, args: {TINY}}}\npreprocessing: [{{name: Lambda, func: '$exec(\"open(\\'{marker}\\', \\'w\\')\")'}}]",
        f"model: {{network: monai.utils.misc.run_cmd, args: {{cmd_list: [sh, -c, 'touch {marker}']}}}}",
        f"model: !!python/object/apply:os.system ['touch {marker}']",
        f"model: !!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "model: {network: &a [*a]}",
        _billion_laughs() + "\nmodel: *l9\n",
        "model:\n  network: monai.networks.nets.DenseNet\n  network: torch.nn.Conv3d\n",
        "model: {network: monai.networks.nets.DenseNet}\n---\nmodel: {network: torch.nn.Conv3d}\n",
        "\t\x00\x01 model: {",
        "model: {network: 'x'",
        "? [a, b]\n: c\n",
    ]


def _run_everything(path: Path, marker: Path) -> None:
    try:
        config = load_config(path)
        load_model(config)
        build_transforms(config.preprocessing)
        preprocess(_image(), config.preprocessing)
    except Medcam3dError:
        pass
    except Exception as error:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"{path.read_bytes()[:300]!r} raised {type(error).__name__}: {error}")
    assert not marker.exists(), path.read_bytes()[:300]


def test_hostile_configs_raise_only_medcam3d_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage")
    for index, text in enumerate(_hostile_configs(tmp_path, marker)):
        _run_everything(_write(tmp_path, text, f"hostile_{index}.yaml"), marker)
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    _run_everything(path, marker)


GARBAGE = [
    None, True, False, -1, 0, 10**12, -(10**30), 1e308, float("nan"), float("inf"), "", "x" * 300, "$x", "@x", "%x",
    [], {}, [[[]]], {"_target_": "os.system"}, [1] * 20, {"a": {"b": [None]}}, "monai.utils.misc.run_cmd",
]


def _mutate(value, rng: random.Random, marker: Path):
    """Replace one random leaf (or add one random key) of a nested config with garbage."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        return {**value, key: _mutate(value[key], rng, marker)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        return value[:index] + [_mutate(value[index], rng, marker)] + value[index + 1:]
    if isinstance(value, dict) and rng.random() < 0.5:
        return {**value, rng.choice(["_target_", "__path", "x", "name", "weights", "cmd_list"]): rng.choice(GARBAGE)}
    return rng.choice(GARBAGE + [f"touch {marker}"])


def test_randomly_mutated_configs_raise_only_medcam3d_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    base = {
        "model": {"network": "monai.networks.nets.DenseNet", "args": dict(TINY_ARGS)},
        "task": "multilabel",
        "class_names": ["a", "b"],
        "target": "all",
        "preprocessing": [
            {"name": "Orientation", "axcodes": "RAS"},
            {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
            {"name": "ScaleIntensityRange", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"name": "ResizeWithPadOrCrop", "spatial_size": [8, 8, 8]},
        ],
        "output": {"normalized": True, "fill": 0.0},
        "sliding_window": {"roi": [8, 8, 8], "overlap": 0.25},
    }
    rng = random.Random(1234)
    for index in range(60):
        config = base
        for _ in range(rng.randint(1, 3)):
            config = _mutate(config, rng, marker)
        path = tmp_path / f"mutant_{index}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        _run_everything(path, marker)
        # The same mutant through the Python API (parse_config) must behave the same way.
        try:
            parsed = parse_config(config, source=path)
            load_model(parsed)
            preprocess(_image(), parsed.preprocessing)
        except Medcam3dError:
            pass
        assert not marker.exists()



# ============================================================================ issue 25
# ----------------------------------------------------------------------------- item 4: no network access without --trust
_COULD_DOWNLOAD = re.compile(r"pretrain|download|url|hub|repo|checkpoint|ckpt|weights|filename|cache_dir|model_dir")


def _allowed_networks():
    """Every constructor a config may name without --trust: nn.Module classes of the network namespaces and the factories."""
    import monai.networks.nets as nets

    for namespace in models.NETWORK_NAMESPACES:
        module = importlib.import_module(namespace)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            owner = getattr(obj, "__module__", "") or ""
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and (owner == namespace or owner.startswith(namespace + ".")):
                if name not in models.NETWORKS_NEEDING_TRUST:
                    yield f"{namespace}.{name}", obj
    for name in sorted(models.NETWORK_FACTORIES):
        if hasattr(nets, name):
            yield f"monai.networks.nets.{name}", getattr(nets, name)


def test_no_allowed_network_downloads_through_its_defaults(monkeypatch):
    """A config that names a network and leaves its download arguments out builds it with them off."""
    from medcam3d.models import build as building

    checked = 0
    for path, factory in _allowed_networks():
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            continue
        risky = [name for name, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and (_COULD_DOWNLOAD.search(name.lower()) or (isinstance(p.default, str) and "://" in p.default))]
        if not risky:
            continue
        received: dict = {}

        def fake(**kwargs):
            received.update(kwargs)
            return nn.Identity()

        fake.__signature__ = signature  # type: ignore[attr-defined]
        monkeypatch.setattr(building, "resolve_untrusted", lambda network, source, fake=fake: fake)
        build_network(path, {}, max_parameters=None)
        bound = signature.bind_partial(**received)
        bound.apply_defaults()
        for name in risky:
            assert not bound.arguments.get(name), f"{path}: {name}={bound.arguments.get(name)!r} would download or read weights"
        checked += 1
    assert checked >= 6  # EfficientNetBN, EfficientNetBNFeatures, EfficientNetEncoder, ResNetFeatures, ResNetEncoder, DenseNet121 ...


@pytest.fixture
def no_network(monkeypatch):
    """Every way MONAI and torch reach the internet fails loudly; the attempts are recorded."""
    import socket
    import urllib.request

    import monai.networks.nets.resnet as monai_resnet
    import torch.hub
    import torch.utils.model_zoo

    attempts: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(what)
            raise OSError(f"test: network access ({what}) is not allowed")
        return call

    for owner, name in [(socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo"),
                        (urllib.request, "urlopen"), (torch.hub, "load_state_dict_from_url"),
                        (torch.hub, "download_url_to_file"), (torch.utils.model_zoo, "load_url"),
                        (monai_resnet, "get_pretrained_resnet_medicalnet")]:
        monkeypatch.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
    return attempts


@pytest.mark.parametrize(
    "network, args",
    [
        ("EfficientNetBN", {"model_name": "efficientnet-b0", "num_classes": 2}),  # 2D by default: pretrained=True downloads
        ("EfficientNetBNFeatures", {"model_name": "efficientnet-b0"}),
        ("EfficientNetEncoder", {"model_name": "efficientnet-b0"}),
        ("ResNetFeatures", {"model_name": "resnet10"}),
        ("ResNetEncoder", {"model_name": "resnet10"}),
    ],
)
def test_networks_that_default_to_pretrained_weights_build_without_network_access(no_network, network, args):
    model = build_network(f"monai.networks.nets.{network}", args)
    assert isinstance(model, nn.Module)
    assert no_network == []
    if network == "EfficientNetBN":  # the block is real: with --trust the default stays and the download is attempted
        with pytest.raises(ModelLoadError, match="network access"):
            build_network(f"monai.networks.nets.{network}", args, trust=True)
        assert no_network


# ----------------------------------------------------------------------------- item 5: preprocessing under the voxel limit
@pytest.fixture
def no_eager_transforms(monkeypatch):
    """Running a transform for real (not its lazy, metadata-only prediction) raises: proves a refusal came first."""
    import monai.transforms as mt

    ran: list[str] = []
    for name in ("SpatialPad", "BorderPad", "DivisiblePad", "Zoom", "Resize", "ResizeWithPadOrCrop", "Spacing"):
        cls = getattr(mt, name)
        original = cls.__call__

        def call(self, *args, _original=original, _name=name, **kwargs):
            if not kwargs.get("lazy"):
                ran.append(_name)
                raise AssertionError(f"{_name} ran for real")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", call)
    return ran


def _grid(shape, spacing=1.0) -> tuple[np.ndarray, Space]:
    return np.zeros(shape, np.float32), Space(shape, np.diag([spacing, spacing, spacing, 1.0]))


@pytest.mark.parametrize(
    "step, shape",
    [
        ({"name": "SpatialPad", "spatial_size": 2048}, (8, 8, 8)),  # an int size applies to every axis: 2048^3
        ({"name": "ResizeWithPadOrCrop", "spatial_size": 1100}, (8, 8, 8)),
        ({"name": "BorderPad", "spatial_border": 600}, (8, 8, 8)),
        ({"name": "DivisiblePad", "k": 2000}, (8, 8, 8)),
        ({"name": "Zoom", "zoom": 12}, (96, 96, 96)),  # keep_size: the whole 1152^3 zoom is made, then cropped
        ({"name": "Zoom", "zoom": 12, "keep_size": False}, (96, 96, 96)),
        ({"name": "Resize", "spatial_size": 2048, "size_mode": "longest"}, (8, 8, 8)),
    ],
)
def test_preprocessing_that_would_make_a_huge_grid_is_refused_before_it_runs(no_eager_transforms, step, shape):
    with pytest.raises(PreprocessingError) as info:
        preprocess(_grid(shape), [step])
    message = str(info.value)
    assert f"preprocessing[0] ({step['name']}) would make a grid of" in message, message
    assert f"more than the {MAX_VOXELS:,} allowed" in message and "--max-voxels" in message and "\n" not in message
    assert no_eager_transforms == []  # refused from the predicted grid: no transform ran for real


def test_a_small_scan_with_huge_voxels_is_refused_before_it_is_resampled(tmp_path, no_eager_transforms):
    import nibabel as nib

    path = tmp_path / "tiny_40mm.nii.gz"  # 35 kB on disk; resampled to 1 mm: 1241^3 voxels, 7 GiB
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.diag([40.0, 40.0, 40.0, 1.0])), path)
    steps = [{"name": "Orientation", "axcodes": "RAS"}, {"name": "Spacing", "pixdim": [1.0, 1.0, 1.0]}]
    with pytest.raises(PreprocessingError, match=r"preprocessing\[1\] \(Spacing\) would make a grid of 1241x1241x1241 .*"
                                                 r"32x32x32 image with voxels of 40 x 40 x 40 mm.*--max-voxels"):
        preprocess(path, steps)
    assert no_eager_transforms == []


def test_a_small_scan_with_huge_voxels_is_refused_under_the_demo_config(tmp_path, no_eager_transforms):
    """32^3 voxels of 40 mm (35 kB): the demo's Spacing to 2 mm makes 621^3 voxels, within 2^30, but the resampling
    took 90 s and 7 GB. Above 256^3 voxels a step may enlarge the scan at most max_voxels / 2^24 times (64)."""
    import nibabel as nib

    from medcam3d.preprocess_grid import GROWTH_FLOOR

    path = tmp_path / "tiny_40mm.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.diag([40.0, 40.0, 40.0, 1.0])), path)
    demo = load_config(ROOT / "configs" / "demo.yaml").preprocessing
    with pytest.raises(PreprocessingError) as info:
        preprocess(path, demo)
    message = str(info.value)
    assert no_eager_transforms == [] and "\n" not in message  # refused before the Spacing ran for real
    assert ("preprocessing[1] (Spacing) would make a grid of 621x621x621 = 239,483,061 voxels from the 32x32x32 image with "
            "voxels of 40 x 40 x 40 mm, 7,308 times the 32,768 voxels of the scan given to the preprocessing, more than the "
            "64 times allowed for a grid over 16,777,216 voxels") in message and "--max-voxels" in message
    assert GROWTH_FLOOR == 1 << 24 and MAX_VOXELS // GROWTH_FLOOR == 64
    with pytest.raises(PreprocessingError, match="more than the 4096 times allowed"):  # the factor follows the limit
        preprocess(path, demo, max_voxels=1 << 36)
    # passing the checks: the step then runs (here: refused by the fixture, which shows it was reached)
    with pytest.raises(PreprocessingError, match="Spacing ran for real"):
        preprocess(path, demo, max_voxels=None)
    fine = tmp_path / "pet_4mm.nii.gz"  # 80^3 of 4 mm to 1 mm: 317^3 voxels, over 2^24 but 61 times the scan: allowed
    nib.save(nib.Nifti1Image(np.zeros((80, 80, 80), np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), fine)
    with pytest.raises(PreprocessingError, match="Spacing ran for real"):
        preprocess(fine, [{"name": "Spacing", "pixdim": [1.0, 1.0, 1.0]}])


def test_the_voxel_limit_can_be_lowered_and_lifted():
    steps = [{"name": "BorderPad", "spatial_border": 2}]  # 8^3 -> 12^3 = 1728 voxels
    with pytest.raises(PreprocessingError, match="more than the 1,000 allowed"):
        preprocess(_image(), steps, max_voxels=1000)
    assert preprocess(_image(), steps, max_voxels=None)[0].shape[1:] == (12, 12, 12)
    compose = build_transforms(steps, max_voxels=1000)
    with pytest.raises(PreprocessingError, match="more than the 1,000 allowed"):
        preprocess(_image(), compose)
    assert preprocess(_image(), compose, max_voxels=2000)[0].shape[1:] == (12, 12, 12)
    with pytest.raises(PreprocessingError, match="max_voxels must be a positive int"):
        build_transforms(steps, max_voxels=-1)
    # a trusted config is limited too, and so is a Compose built by the caller
    import monai.transforms as mt

    with pytest.raises(PreprocessingError, match=r"transform 0 \(BorderPad\) would make"):
        preprocess(_image(), mt.Compose([mt.BorderPad(2)]), max_voxels=1000)
    with pytest.raises(PreprocessingError, match="would make"):
        preprocess(_image(), steps, trust=True, max_voxels=1000)
    # an input already over the limit may still go through transforms that do not enlarge it
    assert preprocess(_image(), [{"name": "Flip", "spatial_axis": 0}], max_voxels=10)[0].shape[1:] == (8, 8, 8)


def test_the_voxel_limit_rides_on_the_config_and_the_cli_flag(tmp_path, capsys):
    from medcam3d import io
    from medcam3d.config import with_limits

    path = _write(tmp_path, f"""
model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: none}}
preprocessing:
  - {{name: BorderPad, spatial_border: 2}}
""")
    config = load_config(path)
    assert config.preprocessing.max_voxels == MAX_VOXELS
    lowered = with_limits(config, max_voxels=1000)
    assert lowered.preprocessing.max_voxels == 1000 and config.preprocessing.max_voxels == MAX_VOXELS
    with pytest.raises(PreprocessingError, match=f"{path}: preprocessing\\[0\\] \\(BorderPad\\) would make"):
        preprocess(_image(), lowered.preprocessing)
    scan = tmp_path / "scan.nii.gz"
    io.write(scan, *_image())
    assert main(["layers", "--config", str(path), "--image", str(scan), "--max-voxels", "1000"]) == 2
    err = capsys.readouterr().err
    assert "preprocessing[0] (BorderPad) would make a grid of 12x12x12 = 1,728 voxels" in err and "--max-voxels" in err
    assert main(["layers", "--config", str(path), "--image", str(scan), "--max-voxels", "none"]) == 0
    capsys.readouterr()


def test_a_bundles_preprocessing_is_limited_too(tmp_path, monkeypatch):
    import monai.transforms as mt
    import nibabel as nib

    from medcam3d.models import bundle_preprocessing
    from test_bundles import BUNDLE_STEPS, write_bundle

    original = mt.Spacing.__call__
    ran: list = []

    def spacing(self, *args, **kwargs):
        if not kwargs.get("lazy"):
            ran.append(True)
            raise AssertionError("Spacing ran for real")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mt.Spacing, "__call__", spacing)
    scan = tmp_path / "tiny_40mm.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.diag([40.0, 40.0, 40.0, 1.0])), scan)
    steps = [*BUNDLE_STEPS[:3], {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.0, 1.0, 1.0]}]
    root = write_bundle(tmp_path / "bundle", steps=steps)
    with pytest.raises(PreprocessingError, match=r"inference.json: preprocessing step 3 \(Spacingd\) would make a grid of "
                                                 r"1241x1241x1241 .*--max-voxels"):
        bundle_preprocessing(root, trust=True)(scan)
    assert ran == []
    monkeypatch.setattr(mt.Spacing, "__call__", original)
    steps = [*BUNDLE_STEPS[:3], {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [20.0, 20.0, 20.0]}]
    root = write_bundle(tmp_path / "small", steps=steps)  # 63^3 from 32^3 (MONAI keeps the field of view): over 1000
    with pytest.raises(PreprocessingError, match="more than the 1,000 allowed"):
        bundle_preprocessing(root, trust=True, max_voxels=1000)(scan)
    assert bundle_preprocessing(root, trust=True, max_voxels=None)(scan)[0].shape[1:] == (63, 63, 63)


# ----------------------------------------------------------------------------- item 5: networks under the activation limit
def test_a_network_with_few_parameters_and_huge_activations_is_refused_before_it_runs(tmp_path, monkeypatch):
    path = _write(tmp_path, "model: {network: torch.nn.Conv3d, args: {in_channels: 1, out_channels: 1, kernel_size: 3, "
                            "padding: 600}, weights: none}\n")
    model = load_model(load_config(path))
    assert sum(p.numel() for p in model.parameters()) == 28  # far inside the parameter budget
    convolved: list = []
    original = nn.Conv3d._conv_forward

    def conv_forward(self, x, weight, bias):
        if x.device.type != "meta":
            convolved.append(tuple(x.shape))
            raise AssertionError("the convolution ran on real data")
        return original(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv3d, "_conv_forward", conv_forward)
    with pytest.raises(InputError) as info:  # 1232^3 outputs: 7 GiB
        model(torch.zeros(1, 1, 32, 32, 32))
    message = str(info.value)
    assert convolved == []  # refused from the estimate on the meta device: no convolution ran on real data
    assert message.startswith(f"{path}: the network's layer outputs for an input of shape (1, 1, 32, 32, 32) would need about 6.9 GiB")
    assert "more than the 4.0 GiB allowed" in message and "--max-activation-memory" in message and "\n" not in message
    assert main(["layers", "--config", str(path), "--shape", "1", "32", "32", "32"]) == 2


def test_the_activation_estimate_counts_what_is_alive_at_once():
    conv = nn.Conv3d(1, 2, 3, padding=1)
    assert models.estimate_activation_bytes(conv, (1, 1, 8, 8, 8)) == 4 * (512 + 2 * 512)  # input + output
    chain = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Conv3d(2, 1, 1), nn.ReLU())
    # the in-place ReLU's and the Sequential's outputs are storages counted already; the peak is while the second conv
    # runs (input, first conv's output, second conv's output); the first conv's output is freed before the last ReLU
    assert models.estimate_activation_bytes(chain, (1, 1, 8, 8, 8)) == 4 * (512 + 2 * 512 + 512)
    assert models.estimate_activation_bytes(torch.jit.script(nn.Conv3d(1, 1, 1)), (1, 1, 4, 4, 4)) is None
    assert all(t.device.type == "cpu" for t in conv.parameters()) and not conv._forward_hooks and not chain[0]._forward_hooks


def test_the_activation_limit_can_be_lowered_lifted_and_works_through_the_explainer(tmp_path):
    from medcam3d import Explainer
    from medcam3d.config import with_limits

    net = build_network("monai.networks.nets.DenseNet", TINY_ARGS, max_activation_bytes=20_000)
    x = torch.rand(1, 1, 16, 16, 16)  # the input alone is 16 KiB; with the layer outputs 32 KiB
    with pytest.raises(InputError, match=r"would need about 32.0 KiB at once .*more than the 19.5 KiB allowed"):
        net(x)
    with pytest.raises(InputError, match="would need about"):  # the explainer runs a view of the model: still limited
        Explainer(net.eval(), "gradcam")(x, target=0)
    models.limit_activations(net, None)
    assert net(x).shape == (1, 2)
    models.limit_activations(net, 20_000)
    with pytest.raises(InputError):
        net(x)
    assert len(net._forward_pre_hooks) == 1  # replaced, not stacked
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: none}}\n")
    config = with_limits(load_config(path), max_activation_bytes=20_000)
    with pytest.raises(InputError, match=f"{path}: the network's layer outputs"):
        load_model(config)(x)
    assert load_model(config, max_activation_bytes=None)(x).shape == (1, 2)
    assert load_model(with_limits(config, max_activation_bytes=None))(x).shape == (1, 2)
    assert load_model(load_config(path))(x).shape == (1, 2)  # the default (4 GiB) lets a real network through
    with pytest.raises(ConfigError, match="max_activation_bytes must be a positive int"):
        with_limits(config, max_activation_bytes=0)


def test_a_grid_under_the_voxel_limit_that_the_network_refuses_is_refused_before_it_is_made(tmp_path, no_eager_transforms,
                                                                                            capsys):
    """DivisiblePad k: 1000 on an 8^3 scan makes 1000^3 voxels, under 2^30: the preprocessing allocated 4 GB (25-38 s)
    before the network's activation limit refused its input. The input shape, predicted from metadata, is checked first."""
    import tracemalloc

    from medcam3d import io
    from medcam3d.config import SlidingWindowConfig
    from medcam3d.jobs.runner import Runner
    from medcam3d.jobs.case_loading import load_case

    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: none}}\n"
                            "preprocessing:\n  - {name: Orientation, axcodes: RAS}\n  - {name: DivisiblePad, k: 1000}\n"
                            "  - {name: ScaleIntensity}\n")
    scan = tmp_path / "scan.nii.gz"
    io.write(scan, *_image())
    config = load_config(path)
    runner = Runner(config, load_model(config), device="cpu")
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"input of shape \(1, 1, 1000, 1000, 1000\) would need about 7.5 GiB") as info:
            load_case(scan, runner.transforms, model=runner.model, input_check=runner.input_check)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * 1024**2, peak  # the 4 GB grid was never made
    assert no_eager_transforms == [] and "--max-activation-memory" in str(info.value) and "\n" not in str(info.value)
    assert main(["layers", "--config", str(path), "--image", str(scan)]) == 2
    assert "would need about 7.5 GiB" in capsys.readouterr().err and no_eager_transforms == []
    # a sliding window feeds the network windows, not the whole grid: nothing to check before preprocessing
    windowed = Runner(config, runner.model, device="cpu", sliding_window=SlidingWindowConfig(roi=(16, 16, 16)))
    assert windowed.input_check is None


def test_the_predicted_input_shape_is_the_one_the_preprocessing_makes():
    from medcam3d.preprocess_grid import predict_shape

    image = preprocess(_image(), [])[0]  # a channel-first MetaTensor
    steps = [{"name": "Orientation", "axcodes": "LPS"}, {"name": "Spacing", "pixdim": [0.7, 1.3, 2.0]},
             {"name": "ScaleIntensityRange", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1},
             {"name": "DivisiblePad", "k": 4}, {"name": "Zoom", "zoom": 1.5, "keep_size": False},
             {"name": "CenterSpatialCrop", "roi_size": [9, 7, 5]}]
    compose = build_transforms(steps)
    predicted = predict_shape(compose.transforms, image)
    assert predicted == tuple(preprocess(image, compose)[0].shape) == (1, 9, 7, 5)
    assert image.pending_operations == [] and tuple(image.shape) == (1, 8, 8, 8)  # metadata only: the input untouched
    # a transform that needs the resampled data after a lazy step, or one that is not known, ends the prediction
    assert predict_shape(build_transforms([*steps[:2], {"name": "CropForeground"}]).transforms, image) is None
    assert predict_shape([lambda x: x], image) is None
    block = np.zeros((8, 8, 8), np.float32)
    block[2:6, 1:4, 3:8] = 1
    block = preprocess((block, Space((8, 8, 8), np.eye(4))), [])[0]
    crop = build_transforms([{"name": "CropForeground"}])  # on the data as they are: predicted from the values
    assert predict_shape(crop.transforms, block) == tuple(preprocess(block, crop)[0].shape) == (1, 4, 3, 5)
    checked = []
    preprocess(image, compose, check_input=checked.append)
    assert checked == [(1, 9, 7, 5)]


def test_building_under_the_budget_leaves_no_process_wide_hooks():
    from torch.nn.modules import module as torch_module

    tables = ("_global_parameter_registration_hooks", "_global_buffer_registration_hooks", "_global_module_registration_hooks")

    def medcam3d_hooks() -> list:
        return [hook for table in tables for hook in getattr(torch_module, table).values()
                if getattr(hook, "__module__", "").startswith("medcam3d")]

    build_network("monai.networks.nets.DenseNet", TINY_ARGS)
    assert medcam3d_hooks() == []
    with pytest.raises(ModelLoadError):
        build_network("monai.networks.nets.DenseNet", TINY_ARGS, max_parameters=1000)
    assert medcam3d_hooks() == []
    net = build_network("monai.networks.nets.DenseNet", TINY_ARGS)
    net(torch.rand(1, 1, 16, 16, 16))  # the activation estimate's hooks live on a meta copy and are gone too
    assert all(not m._forward_hooks for m in net.modules())
    assert [type(h).__name__ for h in net._forward_pre_hooks.values()] == ["_ActivationGuard"]


# ----------------------------------------------------------------------------- item 9: one-line messages, user errors
def test_ensuretype_to_the_meta_device_is_a_user_error(tmp_path, capsys):
    from medcam3d import io

    with pytest.raises(PreprocessingError, match=r"preprocessing\[0\]\.device \(EnsureType\): 'meta' is PyTorch's device without data"):
        build_transforms([{"name": "EnsureType", "device": "meta"}])
    with pytest.raises(PreprocessingError, match=r"preprocessing\[0\]\.device \(EnsureType\): 'gpu7' is not a device"):
        build_transforms([{"name": "EnsureType", "device": "gpu7"}])
    import monai.transforms as mt

    with pytest.raises(PreprocessingError, match="moved the image to PyTorch's 'meta' device"):
        preprocess(_image(), mt.Compose([mt.EnsureType(device="meta")]))
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: none}}\n"
                            "preprocessing: [{name: EnsureType, device: meta}]\n")
    scan = tmp_path / "scan.nii.gz"
    io.write(scan, *_image())
    assert main(["layers", "--config", str(path), "--image", str(scan)]) == 2
    err = capsys.readouterr().err
    assert "preprocessing[0].device (EnsureType): 'meta'" in err and "internal error" not in err


def test_a_failing_transform_is_named_by_its_config_entry_with_the_root_cause(tmp_path):
    path = _write(tmp_path, f"""
model: {{network: monai.networks.nets.DenseNet, args: {TINY}}}
preprocessing:
  - {{name: ScaleIntensity}}
  - {{name: Orientation, axcodes: QQQ}}
""")
    with pytest.raises(PreprocessingError) as info:
        preprocess(_image(), load_config(path).preprocessing)
    message = str(info.value)
    assert message.startswith(f"{path}: preprocessing[1] (Orientation) failed on an image of shape (1, 8, 8, 8): ValueError: "
                              "Not all axis codes"), message
    assert "object at 0x" not in message and "applying transform" not in message and "\n" not in message


def test_monai_errors_that_embed_a_traceback_become_one_line(tmp_path, monkeypatch):
    import monai.networks.nets.resnet as monai_resnet
    import nibabel as nib
    from monai.utils import optional_import

    from medcam3d.models import bundle_preprocessing
    from test_bundles import BUNDLE_STEPS, write_bundle

    # MONAI's optional imports put the import's whole traceback into the message of the error they raise when used
    missing, _ = optional_import("medcam3d_no_such_module", name="hf_hub_download")
    monkeypatch.setattr(monai_resnet, "hf_hub_download", missing)
    with pytest.raises(ModelLoadError) as info:
        build_network("monai.networks.nets.ResNetFeatures", {"model_name": "resnet10", "pretrained": True}, trust=True)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "File \"" not in message, message
    assert "OptionalImportError: from medcam3d_no_such_module import hf_hub_download" in message
    assert "ModuleNotFoundError: No module named 'medcam3d_no_such_module'" in message
    # a bundle's transform that fails with a multi-line message, wrapped by MONAI's Compose ("applying transform <...>")
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), scan)
    fails = {"_target_": "Lambdad", "keys": "image",
             "func": "$lambda x: (_ for _ in ()).throw(ValueError('first line\\n  second line'))"}
    root = write_bundle(tmp_path / "bundle", steps=[*BUNDLE_STEPS[:2], fails])
    with pytest.raises(PreprocessingError) as info:
        bundle_preprocessing(root, trust=True)(scan)
    message = str(info.value)
    assert message.endswith("preprocessing failed on '" + str(scan) + "': ValueError: first line second line"), message
    assert "object at 0x" not in message and "\n" not in message


def test_weights_only_refusals_are_one_line_and_name_the_pickled_type(tmp_path):
    import argparse

    marker = tmp_path / "marker"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "namespace.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage")
    expected = {"evil.pt": r"pickled object of type \w+\.system", "namespace.pt": "pickled object of type argparse.Namespace",
                "garbage.pt": "not a PyTorch weights file"}
    for name, pattern in expected.items():
        path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}, weights: {name}}}\n")
        with pytest.raises(ModelLoadError) as info:
            load_model(load_config(path))
        message = str(info.value)
        assert re.search(pattern, message) and "\n" not in message and "\x1b" not in message, message
        assert ("--trust" in message) == (name != "garbage.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "output, message",
    [
        ("{mask_value: .nan}", "output.mask_value must be a finite number"),
        ("{mask_value: -5}", r"output.mask_value must be in \(0, 1\] with mask_method fraction"),
        ("{mask_value: 1.5}", r"output.mask_value must be in \(0, 1\]"),
        ("{mask_method: percentile, mask_value: 150}", r"output.mask_value must be in \[0, 100\] with mask_method percentile"),
        ("{mask_method: otsu, mask_value: .inf}", "output.mask_value must be a finite number"),
    ],
)
def test_mask_value_is_checked_when_the_config_is_read(tmp_path, output, message):
    path = _write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}}}\noutput: {output}\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: {message}"):
        load_config(path)
    for valid in ("{mask_method: percentile, mask_value: 95}", "{mask_method: otsu}", "{mask_value: 1}"):
        kept = load_config(_write(tmp_path, f"model: {{network: monai.networks.nets.DenseNet, args: {TINY}}}\noutput: {valid}\n"))
        assert kept.output.mask_value == yaml.safe_load(valid).get("mask_value", 0.5)
