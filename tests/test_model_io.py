"""Shared model plumbing: output unwrapping, input placement, hooks, the head check,
probabilities, and the engine's import rule."""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medcam3d
from medcam3d.errors import ModelOutputError, TargetError
from medcam3d.hooks import forward_hooks
from medcam3d.cam_head import linear_head
from medcam3d.model_io import first_tensor, model_device_dtype, model_output, to_model_input
from medcam3d.targets import probabilities
from _models import flatten_linear_cnn, gap_linear_cnn

PACKAGE = Path(medcam3d.__file__).resolve().parent


# ------------------------------------------------------------------------------- first_tensor
def test_first_tensor_unwraps_tuples_lists_and_dicts():
    logits = torch.randn(2, 3)
    other = torch.randn(2, 5)
    assert first_tensor(logits) is logits
    assert first_tensor((logits, other)) is logits
    assert first_tensor([[logits, other], other]) is logits  # nested deep supervision
    assert first_tensor({"features": other, "logits": logits}) is logits
    assert first_tensor(OrderedDict(out=logits, aux=other)) is logits
    assert first_tensor({"only": logits}) is logits
    with pytest.raises(ModelOutputError, match="'a', 'b'"):
        first_tensor({"a": logits, "b": other})
    with pytest.raises(TargetError, match="returned NoneType"):  # ModelOutputError is a TargetError
        first_tensor(None)


class DictModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict:
        return {"features": x.mean(), "logits": self.inner(x)}


def test_explainer_and_metrics_accept_dict_outputs():
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = gap_linear_cnn()
    wrapped = DictModel(plain)
    expected = medcam3d.Explainer(plain, layer="3")(x, "all")
    result = medcam3d.Explainer(wrapped, layer="inner.3")(x, "all")
    torch.testing.assert_close(result.maps, expected.maps)
    torch.testing.assert_close(model_output(wrapped, x), plain(x))
    assert [i.name for i in medcam3d.list_layers(wrapped, (1, 8, 8, 8))][-1] == "inner.3"


# ----------------------------------------------------------------------------- to_model_input
def test_to_model_input_places_and_casts():
    model = gap_linear_cnn().double()
    assert model_device_dtype(model) == (torch.device("cpu"), torch.float64)
    assert model_device_dtype(nn.ReLU()) == (None, None)
    x = torch.randn(1, 1, 4, 4, 4)
    assert to_model_input(x, model).dtype == torch.float64
    assert to_model_input(np.ones((1, 1, 4, 4, 4), dtype=np.int16), model).dtype == torch.float64
    assert to_model_input(x.double(), nn.ReLU()).dtype == torch.float64  # no parameters: kept
    assert to_model_input(x.int(), nn.ReLU()).dtype == torch.float32
    grad_input = x.requires_grad_(True)
    assert not to_model_input(grad_input, model).requires_grad


def test_to_model_input_unwraps_a_meta_tensor():
    from monai.data import MetaTensor

    x = MetaTensor(torch.randn(1, 1, 4, 4, 4), affine=torch.eye(4))
    inputs = to_model_input(x, gap_linear_cnn())
    assert type(inputs) is torch.Tensor


# ------------------------------------------------------------------------------------- hooks
def test_forward_hooks_are_removed_even_when_the_forward_fails():
    model = gap_linear_cnn()
    seen = []
    with pytest.raises(RuntimeError, match="channels"), forward_hooks([(model[0], lambda m, i, o: seen.append(o.shape))]):
        model(torch.randn(1, 2, 8, 8, 8))  # two channels into a one-channel conv
    assert all(not m._forward_hooks for m in model.modules())
    with forward_hooks([(model[0], lambda m, i, o: seen.append(o.shape)), (model[2], lambda m, i, o: seen.append(0))]):
        model(torch.randn(1, 1, 8, 8, 8))
    assert seen == [torch.Size([1, 6, 8, 8, 8]), 0]
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------- head check
def _activations_and_logits(model: nn.Module, layer: int, x: torch.Tensor):
    with torch.no_grad():
        return model[: layer + 1](x), model(x)


def test_linear_head_recognizes_gap_and_flatten_heads_and_nothing_else():
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    gap = gap_linear_cnn()
    kind, linear = linear_head(gap, *_activations_and_logits(gap, 3, x))
    assert (kind, linear) == ("gap+linear", gap[-1])
    flat = flatten_linear_cnn((4, 4, 4))
    assert linear_head(flat, *_activations_and_logits(flat, 2, x)) == ("flatten+linear", flat[-1])
    assert linear_head(flat, *_activations_and_logits(flat, 2, x), kinds=("gap+linear",)) is None
    # an MLP head: the logits are no Linear of the pooled features
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert linear_head(mlp, *_activations_and_logits(mlp, 1, x)) is None
    # tolerance: a perturbation of 1 % of the logits is refused in float32, accepted in bfloat16
    activations, logits = _activations_and_logits(gap, 3, x)
    off = logits * 1.01
    assert linear_head(gap, activations, off) is None
    assert linear_head(gap, activations.bfloat16(), off.bfloat16()) is not None


def test_cam_refuses_a_head_that_is_not_gap_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(medcam3d.LayerError, match="Linear\\(mean\\(layer output\\)\\)"):
        medcam3d.Explainer(model, "cam", layer="1")(torch.randn(1, 1, 6, 6, 6), target=0)


# ----------------------------------------------------------------------------- probabilities
def test_probabilities_by_task():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(probabilities(logits, "multiclass"), torch.softmax(logits, 1))
    torch.testing.assert_close(probabilities(logits, "multilabel"), torch.sigmoid(logits))
    single = torch.tensor([[0.3], [-2.0]])
    binary = probabilities(single, "binary")
    torch.testing.assert_close(binary[:, 1], torch.sigmoid(single[:, 0]))
    torch.testing.assert_close(binary.sum(1), torch.ones(2))
    torch.testing.assert_close(probabilities(single, "multiclass"), binary)  # one logit: always two columns
    segmentation = torch.randn(1, 3, 4, 4, 4)
    torch.testing.assert_close(probabilities(segmentation, "segmentation").sum(1), torch.ones(1, 4, 4, 4))
    with pytest.raises(ValueError, match="task must be one of"):
        probabilities(logits, "regression")


# ------------------------------------------------------------------------------- import rule
ENGINE = ["explainer.py", "explanation.py", "logits.py", "placement.py", "hooks.py", "targets.py", "layers.py", "model_io.py",
          "sliding.py", "torchscript.py", "metrics", "methods"]  # methods: the method strategies' package
FORBIDDEN = {"cli", "napari", "jobs"}


def _imported_modules(path: Path) -> set[str]:
    """Top-level medcam3d submodules a file imports (anywhere in it, lazy imports included)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ("medcam3d", "metrics")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("medcam3d.")}


def test_the_engine_and_the_metrics_import_nothing_from_jobs_or_ui():
    files = [p for entry in ENGINE for p in ((PACKAGE / entry).rglob("*.py") if (PACKAGE / entry).is_dir()
                                             else [PACKAGE / entry] if (PACKAGE / entry).exists() else [])]
    assert len(files) > 15  # the engine modules, the metrics and the method files
    offending = {str(p.relative_to(PACKAGE)): sorted(_imported_modules(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offending.items() if v} == {}
    # the checker sees relative imports, including lazy ones inside functions
    assert "space" in _imported_modules(PACKAGE / "metrics" / "faithfulness.py")
    assert "explainer" in _imported_modules(PACKAGE / "metrics" / "sanity.py")
