"""The result records of the engine: an :class:`Explanation` (maps of one batch on the target layer's
grid, with their provenance) and a :class:`Pass` (what one forward/backward pass of the engine gives
the methods that run their own passes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .receptive_field import ReceptiveField
from .targets import Target

__all__ = ["Explanation", "Pass"]


@dataclass(frozen=True)
class Explanation:
    """Maps for one batch, on the target layer's (feature) grid.

    Attributes
    ----------
    maps : (B, T, *feature_shape) Tensor
        float32 raw maps (not normalized); ReLU applied unless ``relu=False``.
    targets : list of int, or list of list of int
        The T class indices explained, in map order (one list per sample when
        samples differ, e.g. ``"predicted"`` on a batch).
    logits : (B, C) or (B, C, *spatial) Tensor
        The logits the scores come from, detached: the model's output, or, when the model ends in a
        softmax/sigmoid that was undone (see ``output_activation``), that activation's input.
    scores : (B, T) Tensor
        The explained scores (logit, negated logit, or region sum), detached.
    class_indices : (B, T) LongTensor
    method, layer : str
    relu : bool
    input_shape, feature_shape : tuple of int
        Spatial shapes of the input and of the maps.
    input_affine : (4, 4) or (B, 4, 4) ndarray or None
        The input grid's affine when ``x`` was a MONAI ``MetaTensor``.
    class_names : list of str or None
    output_activation : {"none", "softmax", "log_softmax", "sigmoid"}
        The activation of the model's output that was undone before scoring ("none": the output
        was explained as it is).
    placement : {"receptive_field", "align_corners"}
        How the feature grid is placed on the input grid (:func:`medcam3d.space.feature_space`):
        each cell at the centre of its receptive field (``receptive_field``), or by the
        ``align_corners=False`` convention.
    receptive_field : ReceptiveField or None
        The target layer's receptive field for this input (:func:`medcam3d.layers.receptive_field`),
        with ``placement="receptive_field"``; None otherwise.
    output_field : ReceptiveField or None
        For a segmentation output at another resolution than the input, with
        ``placement="receptive_field"``: the receptive field of the model's output voxels, which
        places them on the input grid (:func:`medcam3d.output_grids.output_grid`); None otherwise (the
        output is on the input grid, or is placed by the convention).
    diagnostics : dict
        What a method measured about its own maps, e.g. Integrated Gradients' completeness error,
        the patches of occlusion or the channels Score-CAM used (empty for the CAM family).
    """

    maps: torch.Tensor
    targets: list[int] | list[list[int]]
    logits: torch.Tensor
    scores: torch.Tensor
    class_indices: torch.Tensor
    method: str
    layer: str
    relu: bool
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    input_affine: np.ndarray | None = None
    class_names: list[str] | None = None
    output_activation: str = "none"
    placement: str = "align_corners"
    receptive_field: ReceptiveField | None = None
    output_field: ReceptiveField | None = None
    diagnostics: dict = field(default_factory=dict)

    @classmethod
    def from_pass(cls, run: Pass, *, maps: torch.Tensor, method: str, layer: str, relu: bool, input_shape: tuple[int, ...],
                  input_affine: np.ndarray | None, class_names: list[str] | None, placement: str,
                  receptive_field: ReceptiveField | None, diagnostics: dict | None = None) -> Explanation:
        """The explanation of ``maps`` (``(B, T, *grid)``, ReLU already applied when asked) made from the
        pass over the user's input: its target, logits, scores, output activation undone and output
        placement."""
        return cls(
            maps=maps.detach().float().contiguous(),
            targets=run.target.labels(),
            logits=run.logits.detach().float(),
            scores=run.scores.detach().float(),
            class_indices=run.target.class_indices,
            method=method,
            layer=layer,
            relu=relu,
            input_shape=input_shape,
            feature_shape=tuple(maps.shape[2:]),
            input_affine=input_affine,
            class_names=class_names,
            output_activation=run.undone,
            placement=placement,
            receptive_field=receptive_field,
            output_field=run.output_field,
            diagnostics=dict(diagnostics or {}),
        )

    def to_scanner_space(self, scanner_space, *, input_space=None, sample: int = 0, fill: float = 0.0):
        """Each explained class's map of one sample on the scan's grid, by class name (or index).

        ``result.to_scanner_space(scan_space)["nodule"]`` is a :class:`~medcam3d.heatmap.Heatmap`;
        see :func:`medcam3d.heatmap.to_scanner_space` and :class:`~medcam3d.heatmap.ClassMaps`.
        """
        from .heatmap import to_scanner_space

        return to_scanner_space(self, scanner_space, input_space=input_space, sample=sample, fill=fill)

    def feature_maps(self, *, input_space=None, sample: int = 0):
        """Each explained class's map of one sample on its feature grid (exact affine), by class name.

        See :func:`medcam3d.heatmap.feature_maps`.
        """
        from .heatmap import feature_maps

        return feature_maps(self, input_space=input_space, sample=sample)

    def target_names(self) -> list[str]:
        """Names of the explained classes (their indices as text without class names)."""
        row = self.class_indices[0].tolist()
        if self.class_names is None:
            return [str(i) for i in row]
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in row]


@dataclass(frozen=True)
class Pass:
    """What one pass of :meth:`medcam3d.explainer.Explainer._pass` gives (the methods beyond one layer
    build on it).

    Attributes
    ----------
    activations : list of Tensor
        The captured tensors, detached: each layer's output ``(B, K, *spatial)``, or the input.
    gradients : list of (B, T, *tensor.shape[1:]) float32 Tensor, or None
        ``∂ score_t / ∂ tensor`` for each captured tensor (None without tracking).
    logits : Tensor
        Detached; as :attr:`Explanation.logits`.
    undone : str
        The output activation undone (:attr:`Explanation.output_activation`).
    target : Target
        The resolved target (pass it on to passes over perturbed copies).
    scores : (B, T) Tensor
        Detached.
    output_field : ReceptiveField or None
        The receptive field that places the model's output voxels on the input grid
        (:attr:`Explanation.output_field`), found once in the pass over the user's own input (the one
        given ``x``) and carried to the method's :class:`Explanation`; None in the passes over
        perturbed copies, and where the output is on the input grid or placed by the convention.
    """

    activations: list[torch.Tensor]
    gradients: list[torch.Tensor] | None
    logits: torch.Tensor
    undone: str
    target: Target
    scores: torch.Tensor
    output_field: ReceptiveField | None = None
