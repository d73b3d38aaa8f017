"""The Explainer: one lean forward pass, gradients at the target layer only,
every requested class map at once."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ExplainerMemoryError  # noqa: F401  (re-exported)
from .errors import InputError, LayerError
from .methods import DEFAULT_METHOD, Method, MethodContext, get_method as get_explainer
from .hooks import ActivationCapture, model_lock, preserved_model_state
from .layers import find_cam_head, linear_head, resolve_layer, select_auto_layer, spatial_dims_of
from .modeling import first_tensor, to_model_input
from .targets import resolve_target

__all__ = ["Explainer", "Explanation", "ExplainerMemoryError"]

_AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


logger = logging.getLogger(__name__)


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
        The model's output, detached.
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

    def to_scanner_space(self, scanner_space=None, *, input_space=None, sample: int = 0, fill: float = 0.0):
        """Each map of one sample as a :class:`~medcam3d.heatmap.Heatmap` on the scan's grid.

        See :func:`medcam3d.heatmap.to_scanner_space`.
        """
        from .heatmap import to_scanner_space

        return to_scanner_space(self, scanner_space, input_space=input_space, sample=sample, fill=fill)

    def target_names(self) -> list[str]:
        """Names of the explained classes (their indices as text without class names)."""
        row = self.class_indices[0].tolist()
        if self.class_names is None:
            return [str(i) for i in row]
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in row]


class Explainer:
    """Class activation maps for a CNN (3D or 2D), for one or all classes at once.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``(B, C)`` (``C = 1``: binary), or a
        segmentation network returning ``(B, C, *spatial)`` (a tuple, list or
        dict output is unwrapped by :func:`medcam3d.modeling.first_tensor`).
        Never modified: hooks live for one call, ``training`` flags and buffers
        are restored, no ``.grad`` is written, ``requires_grad`` is untouched.
        Calls from several threads on one model (or on models sharing
        submodules) are safe: they run one at a time.
    method : str or Method
        ``"hirescam"`` (default), ``"gradcam"``, ``"cam"``, ``"gradcam++"``,
        ``"xgradcam"``, ``"layercam"``, ``"eigencam"``.
    layer : str, nn.Module or "auto"
        Target layer. ``"auto"``: the last module with a spatial output
        (logged at INFO; chosen on the first input and kept, chosen again for an
        input size where that layer no longer has a spatial output).
    class_names : sequence of str, optional
        Names for string targets and for provenance.
    eval_mode : bool
        Run the model in eval mode (BatchNorm running statistics, no dropout).
        False: the modules' own flags (train-mode BatchNorm normalizes with the
        batch's statistics, dropout is active).
    update_batchnorm_stats : bool
        With ``eval_mode=False``, keep the running statistics that train-mode
        BatchNorm layers update during the forward. Default False: every buffer
        is restored bitwise after the call.
    amp : {None, "bf16", "fp16"}
        Mixed precision (``torch.autocast``) for the forward and backward; maps are combined in
        float32. bf16 roughly halves activation memory on GPU.

    Examples
    --------
    >>> explainer = Explainer(model, method="hirescam", layer="auto")   # doctest: +SKIP
    >>> result = explainer(x, target="all")                             # doctest: +SKIP
    >>> result.maps.shape   # (B, C, d, v, u)                           # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = DEFAULT_METHOD,
        layer: str | nn.Module = "auto",
        *,
        class_names: Sequence[str] | None = None,
        eval_mode: bool = True,
        update_batchnorm_stats: bool = False,
        amp: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            message = f"model must be a torch.nn.Module, not {type(model).__name__}."
            raise TypeError(message)
        if amp not in _AMP_DTYPES:
            message = f"amp must be one of {list(_AMP_DTYPES)}, not {amp!r}."
            raise ValueError(message)
        self.amp = amp
        self.model = model
        self.method = get_explainer(method)
        self.class_names = list(class_names) if class_names is not None else None
        self.eval_mode = eval_mode
        self.update_batchnorm_stats = update_batchnorm_stats
        self._auto = isinstance(layer, str) and layer == "auto"
        self._layer: tuple[str, nn.Module] | None = None if self._auto else resolve_layer(model, layer)
        self._auto_cache: dict[tuple[int, int], tuple[str, nn.Module, tuple[int, ...]]] = {}
        self._spatial_dims = spatial_dims_of(model)
        self._batched_vjp = True

    def __repr__(self) -> str:
        layer = "auto" if self._auto else self._layer[0]  # type: ignore[index]
        return f"Explainer(model={type(self.model).__name__}, method={self.method.name!r}, layer={layer!r})"

    # ------------------------------------------------------------------ call
    def __call__(self, x: torch.Tensor, target: object = None, *, relu: bool = True) -> Explanation:
        """Explain a batch.

        Parameters
        ----------
        x : (B, C_in, *spatial) Tensor or MetaTensor
        target : int, str, list, "all", "predicted", Tensor, Region or Target
            What to explain (see :mod:`medcam3d.targets`); default ``"predicted"``.
        relu : bool
            Apply ReLU to the maps (False: signed maps).

        Returns
        -------
        Explanation

        Raises
        ------
        InputError
            ``x`` is not a tensor, is empty (a batch of size 0), has the wrong rank, a bool,
            complex or unrepresentable integer dtype, or NaN/Inf values. Floating inputs of
            another dtype or on another device are cast and moved to the model's
            (:func:`medcam3d.modeling.to_model_input`).
        """
        try:
            # The whole forward/backward/restore holds the model: concurrent calls serialize.
            with model_lock(self.model):
                try:
                    return self._explain(x, target, relu)
                except LayerError:
                    cached = self._auto_cache.get((x.shape[1], x.ndim)) if self._auto and x.ndim >= 3 else None
                    if cached is None or cached[2] == tuple(x.shape[2:]):
                        raise
                    del self._auto_cache[(x.shape[1], x.ndim)]  # chosen on another size: choose again
                    return self._explain(x, target, relu)
        except torch.OutOfMemoryError as error:
            message = (
                f"Out of memory while explaining an input of shape {tuple(x.shape)} on {x.device}: {error}. "
                "Options: explain through sliding windows (medcam3d.sliding_window / CLI --roi), use mixed precision "
                "(amp='bf16' / --amp bf16), a smaller batch, or the CPU (--device cpu)."
            )
            raise ExplainerMemoryError(message) from None

    def _explain(self, x: torch.Tensor, target: object, relu: bool) -> Explanation:
        inputs, input_affine = self._prepare_input(x)
        name, module = self._target_layer(inputs)
        autocast = torch.autocast(inputs.device.type, dtype=_AMP_DTYPES[self.amp], enabled=self.amp is not None)
        track = self.method.needs_gradients
        capture = ActivationCapture(module, name, track_gradients=track, spatial_ndim=inputs.ndim)
        state = preserved_model_state(self.model, eval_mode=self.eval_mode, restore_buffers=not self.update_batchnorm_stats)
        with state, capture, autocast:
            with torch.no_grad():  # no graph before the target layer; the hook re-enables it
                outputs = self.model(inputs)
            activations = capture.activations
            if activations is None:
                message = (
                    f"Layer {name!r} did not run during the forward pass, so it cannot be explained. "
                    "Choose a layer on the path from input to output (see medcam3d.list_layers)."
                )
                raise LayerError(message)
            outputs = self._check_outputs(outputs, name)
            resolved = resolve_target(target, outputs, self.class_names)
            with torch.enable_grad():
                scores = resolved.scores(outputs)
                gradients = self._gradients(scores, activations, name) if track else None
            context = MethodContext(resolved.class_indices, resolved.signs, self._head_weight(activations, outputs))
            with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
                gradients = None if gradients is None else gradients.float()
                maps = self.method.combine(activations.detach().float().unsqueeze(1), gradients, context)
                if not self.method.class_specific:
                    maps = maps.expand(-1, resolved.num_targets, *maps.shape[2:])
                if relu:
                    maps = maps.clamp_min(0)
        return Explanation(
            maps=maps.float().contiguous(),
            targets=resolved.labels(),
            logits=outputs.detach().float(),
            scores=scores.detach().float(),
            class_indices=resolved.class_indices,
            method=self.method.name,
            layer=name,
            relu=relu,
            input_shape=tuple(inputs.shape[2:]),
            feature_shape=tuple(activations.shape[2:]),
            input_affine=input_affine,
            class_names=self.class_names,
        )

    # --------------------------------------------------------------- helpers
    def _prepare_input(self, x: object) -> tuple[torch.Tensor, np.ndarray | None]:
        if torch.is_inference_mode_enabled():
            message = "Explaining needs autograd: call the explainer outside torch.inference_mode()."
            raise RuntimeError(message)
        affine = getattr(x, "affine", None)
        input_affine = None if affine is None else np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
        inputs = to_model_input(x, self.model)
        dims = self._spatial_dims
        if dims is not None and inputs.ndim != dims + 2:
            fix = " Add the batch axis with x[None]." if inputs.ndim == dims + 1 else ""
            message = (
                f"x has shape {tuple(inputs.shape)}, but this model takes {dims}D inputs of shape "
                f"(B, C_in, {', '.join('DVU'[-dims:] if dims <= 3 else '*')}).{fix}"
            )
            raise InputError(message)
        if inputs.ndim < 3:
            message = f"x must have shape (B, C_in, *spatial), not {tuple(inputs.shape)}."
            raise InputError(message)
        return inputs, input_affine

    def _target_layer(self, inputs: torch.Tensor) -> tuple[str, nn.Module]:
        if not self._auto:
            assert self._layer is not None
            return self._layer
        # One probe per channel count and rank: the choice rarely depends on the size, and a
        # probe costs a forward pass. A size where the cached layer fails is probed anew.
        key = (inputs.shape[1], inputs.ndim)
        if key not in self._auto_cache:
            self._auto_cache[key] = (*select_auto_layer(self.model, inputs), tuple(inputs.shape[2:]))
        name, module, _ = self._auto_cache[key]
        return name, module

    def _check_outputs(self, outputs: object, layer: str) -> torch.Tensor:
        outputs = first_tensor(outputs)
        if not bool(torch.isfinite(outputs.detach()).all()):
            message = "The model produced NaN/Inf outputs for this input; check the weights and the preprocessing."
            raise InputError(message)
        if self.method.needs_gradients and not outputs.requires_grad:
            message = (
                f"The model's output does not depend on layer {layer!r} through differentiable operations "
                "(or the model detaches it), so there is no gradient to explain. Choose a layer on the path "
                "to the output."
            )
            raise LayerError(message)
        return outputs

    def _gradients(self, scores: torch.Tensor, activations: torch.Tensor, layer: str) -> torch.Tensor:
        """``∂ scores[:, t] / ∂ activations`` for every t: ``(B, T, K, *spatial)``.

        All T vector–Jacobian products in one batched backward through the head
        (``is_grads_batched``); a loop where the network does not support it.
        """
        targets = scores.shape[1]
        if not scores.requires_grad:
            message = f"The scores do not depend on layer {layer!r}; choose a layer on the path to the output."
            raise LayerError(message)
        if targets == 1:
            (gradients,) = torch.autograd.grad(scores[:, 0].sum(), activations)
            return gradients.unsqueeze(1)
        if self._batched_vjp:
            basis = torch.eye(targets, device=scores.device, dtype=scores.dtype)
            grad_outputs = basis.unsqueeze(1).expand(targets, scores.shape[0], targets)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # vmap fallback notices
                    (gradients,) = torch.autograd.grad(
                        scores, activations, grad_outputs=grad_outputs, is_grads_batched=True, retain_graph=True
                    )
                return gradients.transpose(0, 1)
            except RuntimeError as error:
                self._batched_vjp = False
                logger.info("Batched VJP not supported by this network (%s); looping over %d targets.", error, targets)
        rows = []
        for t in range(targets):
            (gradient,) = torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=t < targets - 1)
            rows.append(gradient)
        return torch.stack(rows, dim=1)

    def _head_weight(self, activations: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        if not self.method.needs_head:
            return None
        if outputs.ndim != 2:
            message = f"{self.method.name} needs a classifier (B, C) output; this model returns {tuple(outputs.shape)}."
            raise LayerError(message)
        find_cam_head(self.model, activations.shape[1])  # raises, with advice, when no Linear fits
        # CAM is only defined for GAP + Linear after the target layer: check it on this batch.
        head = linear_head(self.model, activations, outputs, kinds=("gap+linear",))
        if head is None:
            message = (
                "CAM needs the target layer to be followed by global average pooling and one Linear layer "
                "only, but the logits differ from Linear(mean(layer output)) here. Choose the layer right "
                "before the pooling (layer='auto' usually is), or use method='hirescam'."
            )
            raise LayerError(message)
        return head[1].weight.detach().float()
