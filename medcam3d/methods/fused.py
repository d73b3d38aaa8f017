"""Multi-layer fusion: CAMs of several resolution stages, combined on the finest grid, from one pass."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LayerError, UsageError
from .base import Method
from .passes import explanation, feature_grid, onto

COMBINES = ("product", "mean")
CAMS = ("hirescam", "layercam")


def stage_outputs(records: Sequence[tuple[str, tuple[int, ...]]], last: str) -> list[str]:
    """The output of each resolution stage up to and including layer ``last``.

    Parameters
    ----------
    records : sequence of (name, spatial shape)
        Candidate layers in completion order (:func:`medcam3d.layers.list_layers`).
    last : str
        The deepest stage (the target layer).

    Returns
    -------
    list of str
        For every spatial shape met before ``last``, the last layer with that shape (the output of
        that stage, after everything computed at its resolution), in completion order; ``last``
        itself ends the list.
    """
    names = [name for name, _ in records]
    if last not in names:
        raise LayerError(f"Layer {last!r} has no spatial output for this input; choose a layer listed by medcam3d.list_layers.")
    upto = records[: names.index(last) + 1]
    final: dict[tuple[int, ...], int] = {}
    for index, (_, shape) in enumerate(upto):
        final[shape] = index  # the last layer of each shape
    final[upto[-1][1]] = len(upto) - 1
    return [upto[i][0] for i in sorted(set(final.values()))]


class FusedCAM(Method):
    r"""HiResCAM (or LayerCAM) of several resolution stages, each normalized, combined on the finest grid.

    For each stage ``s`` the class map ``M_s = ReLU(Σ_k W_k ⊙ A_k)`` (HiResCAM: ``W = ∂y^c/∂A``;
    LayerCAM: ``W = ReLU(∂y^c/∂A)``) is divided by its maximum (per sample and class), resampled
    linearly onto the finest stage's grid (each grid placed on the input as the explainer's
    ``placement`` says: at its cells' receptive-field centres by default; edge cells repeated) and
    the stages are combined voxel by voxel:

    * ``"product"`` (default): the geometric mean ``(Π_s M_s)^(1/S)``. A voxel scores high only when
      every stage has evidence there: the deep stage, class-specific but coarse, gates the shallow
      ones, which resolve finer but respond to any edge of the right kind (an AND of scales; the
      same idea as :func:`medcam3d.segment.gated_maps`).
    * ``"mean"``: the arithmetic mean (an OR of scales): keeps the shallow stages' class-agnostic
      responses wherever the deep stage is silent.

    The maps are non-negative (each stage is ReLU'd before it is normalized), on the finest stage's
    grid, and the ``layer`` of the explanation names the stages joined by ``+``.

    Stages: by default the output of each resolution stage of the network up to the target layer
    (``layer="auto"`` or the layer given to the :class:`~medcam3d.explainer.Explainer`): for every
    spatial size, the last module computed at that size (e.g. MONAI DenseNet121: ``features.relu0``,
    ``features.transition1.conv`` … ``class_layers.relu``; resnet: ``act``, ``layer1`` …
    ``layer4``), found once per model and input shape with one inference on zeros. ``layers=[...]``
    names them instead.

    Cost: one forward pass, with autograd from the first stage on (memory of a training forward from
    there), and one batched vector–Jacobian product for all T classes and all stages.

    Parameters
    ----------
    layers : sequence of str, optional
        The stages' module names; default: found automatically (see above).
    cam : {"hirescam", "layercam"}
        The map of each stage.
    combine : {"product", "mean"}

    References
    ----------
    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization", IEEE TIP
    2021 (fusing several stages).
    """

    name = "fused"
    level = "layers"

    def __init__(self, layers: Sequence[str] | None = None, cam: str = "hirescam", combine: str = "product") -> None:
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers) or not layers):
            raise UsageError(f"fused: layers must be a non-empty list of module names, not {layers!r}.")
        if cam not in CAMS:
            raise UsageError(f"fused: cam must be one of {', '.join(CAMS)}, not {cam!r}.")
        if combine not in COMBINES:
            raise UsageError(f"fused: combine must be one of {', '.join(COMBINES)}, not {combine!r}.")
        self.layers = None if layers is None else list(layers)
        self.cam = cam
        self.combination = combine
        self._stages: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[str]]] = weakref.WeakKeyDictionary()

    def stages(self, model: nn.Module, input_shape: tuple[int, ...], last: str) -> list[str]:
        """The stage layers for ``model`` on inputs of shape ``(C_in, *spatial)``, ending with ``last``."""
        cached = self._stages.setdefault(model, {})
        key = (tuple(input_shape), last)
        if key not in cached:
            from ..layers import list_layers

            records = [(info.name, tuple(info.output_shape[2:])) for info in list_layers(model, input_shape)]
            cached[key] = stage_outputs(records, last)
        return list(cached[key])

    def explain(self, engine: Any, inputs: torch.Tensor, x: object, target: object, *, relu: bool,
                input_affine: Any) -> Any:
        from ..layers import resolve_layer

        if self.layers is not None:
            layers = [resolve_layer(engine.model, name) for name in self.layers]
        else:
            last, _ = engine._target_layer(inputs)
            layers = [resolve_layer(engine.model, name) for name in self.stages(engine.model, tuple(inputs.shape[1:]), last)]
        run = engine._pass(inputs, tuple(layers), target, x=x)
        assert run.gradients is not None
        spatial = tuple(int(n) for n in inputs.shape[2:])
        placements = [engine._placement(name, inputs) for name, _ in layers]
        stage_maps = []
        with torch.no_grad():
            for activations, gradients in zip(run.activations, run.gradients):
                weights = gradients if self.cam == "hirescam" else gradients.clamp_min(0)
                stage = (weights * activations.float().unsqueeze(1)).sum(dim=2).clamp_min(0)  # (B, T, *grid)
                peak = stage.flatten(start_dim=2).amax(dim=2).reshape(*stage.shape[:2], *([1] * (stage.ndim - 2)))
                stage_maps.append(torch.where(peak > 0, stage / peak.clamp_min(1e-30), torch.zeros_like(stage)))
            grids = [feature_grid(spatial, m.shape[2:], field) for m, (_, field) in zip(stage_maps, placements)]
            finest = max(range(len(stage_maps)), key=lambda s: int(np.prod(stage_maps[s].shape[2:])))
            stacked = torch.stack([onto(m, grid, grids[finest]) for m, grid in zip(stage_maps, grids)])  # (S, B, T, *)
            if self.combination == "product":
                maps = stacked.clamp_min(0).log().mean(dim=0).exp() if len(stage_maps) > 1 else stacked[0]
            else:
                maps = stacked.mean(dim=0)
        names = [name for name, _ in layers]
        diagnostics = {"stages": names, "stage_shapes": [tuple(m.shape[2:]) for m in stage_maps],
                       "placements": [mode for mode, _ in placements], "cam": self.cam, "combine": self.combination}
        return explanation(engine, run, inputs=inputs, input_affine=input_affine, maps=maps,
                           layer="+".join(names), relu=relu, placement=placements[finest], diagnostics=diagnostics)

    def __repr__(self) -> str:
        return f"FusedCAM(layers={self.layers!r}, cam={self.cam!r}, combine={self.combination!r})"

