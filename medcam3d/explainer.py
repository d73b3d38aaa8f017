"""The Explainer: one lean forward pass, gradients at the target layer only,
every requested class map at once (§4, §5).

Plain PyTorch models, TorchScript models (scripted, traced, or loaded with ``torch.jit.load``) and
plain models with scripted submodules are explained the same way; see :mod:`medcam3d.torchscript`
for how a layer inside a scripted graph is reached without hooks."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import ExplainerMemoryError, InferenceModeError, InputError, LayerError, ProbabilityOutputWarning
from .explanation import Explanation, Pass
from .capture import ActivationCapture, InputCapture
from .hooks import counterpart, isolated_model, model_lock
from .cam_head import find_cam_head, linear_head
from .input_rank import expected_spatial_dims, rank_mismatch_message
from .layers import auto_layer, resolve_layer
from .logits import checked_outputs, forward_errors, logits_to_explain
from .methods import DEFAULT_METHOD, Method, MethodContext, get_method
from .model_io import OUTPUT_ACTIVATIONS, OutputActivationWatch, to_model_input
from .placement import layer_placement, output_placement, region_input_space
from .receptive_field import PLACEMENTS, ReceptiveField
from .targets import resolve_target

if TYPE_CHECKING:
    from .config import Config
    from .preprocess_bundle import BundlePreprocessing
    from .preprocess_nnunet import NnunetPreprocessing

__all__ = ["Explainer"]

_AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


logger = logging.getLogger(__name__)


class Explainer:
    """Class activation maps for a CNN (3D or 2D), for one or all classes at once.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``(B, C)`` (``C = 1``: binary), or a
        segmentation network returning ``(B, C, *spatial)`` (a tuple, list or
        dict output is unwrapped by :func:`medcam3d.model_io.first_tensor`).
        Never modified: the forward passes run through a view of the model
        (:func:`medcam3d.hooks.isolated_model`: shallow copies of the modules whose mode must
        change and of the target layer, sharing every parameter and buffer), so neither the
        eval mode nor the hooks ever reach the model's own modules; train-mode buffer updates
        are undone, no ``.grad`` is written, ``requires_grad`` is untouched.
        Calls from several threads on one model (or on models sharing
        submodules) are safe: they run one at a time. Another thread may call
        the model itself meanwhile (training it, or predicting): its calls run
        in their own mode and are neither seen nor changed by medcam3d. They
        share the weights, though: an optimizer step or a train-mode BatchNorm
        update made during an explanation is read by it mid-pass (hold
        :func:`medcam3d.hooks.model_lock` around such steps, or explain a copy).
        Modules that cannot be viewed (TorchScript, ``torch.compile``,
        ``DistributedDataParallel``) are put in eval mode in place for the call;
        another thread calling one then gets a :class:`~medcam3d.errors.ConcurrentUseWarning`.

        TorchScript models (``torch.jit.script``/``trace``, ``torch.jit.load``) work too: a layer
        inside a scripted graph is reached by running a copy of the graph split at that layer
        (:mod:`medcam3d.torchscript`), with no graph before the layer and gradients from
        ``autograd.grad`` only, in one pass. Layers inside an ``if``/loop of the graph, or called
        twice, cannot be reached (the error lists those that can). When a *plain* model calls a
        *scripted submodule* that contains the target layer, that submodule runs twice (once as
        the model calls it, once split), as PyTorch offers no way to intercept it otherwise.
    method : str or Method
        Where the model's evidence is, on a layer's grid: ``"hirescam"`` (default), ``"gradcam"``,
        ``"cam"``, ``"gradcam++"``, ``"xgradcam"``, ``"layercam"``, ``"eigencam"``, ``"fused"``
        (several stages combined on the finest), ``"scorecam"`` (gradient-free). Where in the
        patient, class by class on the input's voxels: ``"gradxinput"``, ``"smoothgrad"``,
        ``"integrated_gradients"``, ``"occlusion"`` (gradient-free); ``layer`` does not apply to
        them. A name may carry parameters (``"smoothgrad(samples=32)"``) or be a
        :class:`~medcam3d.methods.Method` instance (:mod:`medcam3d.methods`).
    layer : str, nn.Module or "auto"
        Target layer. ``"auto"``: :func:`medcam3d.layers.auto_layer`, the last module with a
        spatial output (for segmentation networks: before the layers that produce the logits),
        chosen on a small probe input, cached per model, input channels and rank (logged at INFO);
        chosen again on the full size for an input where that layer has no spatial output.
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
    output_activation : {"auto", "none", "softmax", "sigmoid"}
        What the model's output is, so that the *logits* are explained:

        * ``"auto"`` (default): when the output is produced by a softmax, log-softmax or sigmoid
          applied last — an ``nn.Softmax``/``nn.LogSoftmax``/``nn.Sigmoid`` module, a function call
          in ``forward`` (``torch.softmax(y, 1)``, ``F.sigmoid(y)``, ``y.softmax(1)`` ...), or, in a
          TorchScript graph, the operator — its input (the logits) is explained instead, with a
          :class:`ProbabilityOutputWarning`. The same weights give the same maps as an eager module,
          an eager function call, a scripted or a traced model. When no such activation is found but
          the values look like probabilities (:func:`medcam3d.model_io.looks_like_probabilities`),
          the output is explained as it is, with a warning that says which option to pass.
        * ``"softmax"``/``"sigmoid"``: the output is that activation of logits. A trailing activation's
          input is explained (as with ``"auto"``, without the warning); where none can be found (the
          activation is written out, e.g. ``e / e.sum(1)``), it is inverted (a warning says so):
          ``logit(p)`` for sigmoid, which recovers the logit exactly except where the sigmoid
          saturated; ``log p`` for softmax, which is the logit minus ``logsumexp`` — equal for all
          classes of a sample, so maps of *differences* between classes are exact, but the map of
          one class becomes its logit's map minus the probability-weighted mean of all classes'
          maps (:func:`medcam3d.model_io.logits_from_probabilities`).
        * ``"none"``: explain the output as it is.
    placement : {"receptive_field", "align_corners"}
        Where the maps' cells are placed on the input (and so in the scanner's space):
        ``"receptive_field"`` (default) at the centre of each cell's receptive field, computed from
        the network (:func:`medcam3d.layers.receptive_field`: its kernels, strides, paddings and
        dilations, or a gradient probe where the graph cannot be read), once per model, layer and
        input shape; ``"align_corners"`` by the ``F.interpolate(align_corners=False)`` convention
        that other libraries use, which can be off by up to half a cell.

        Why: HiResCAM's faithfulness (the map is the element-wise gradient × activation
        decomposition of the score; it sums to ``logit − bias`` for a flatten + Linear head) is a
        statement about the score whose gradient is taken. The gradient of a softmax probability,
        ``p_c (∇z_c − Σ_j p_j ∇z_j)``, mixes every class's evidence and vanishes as the model grows
        confident (``p_c → 1``), so probability maps fade or show the competing classes; logits do
        not saturate.

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
        output_activation: str = "auto",
        placement: str = "receptive_field",
    ) -> None:
        if not isinstance(model, nn.Module):
            message = f"model must be a torch.nn.Module, not {type(model).__name__}."
            raise TypeError(message)
        if amp not in _AMP_DTYPES:
            message = f"amp must be one of {list(_AMP_DTYPES)}, not {amp!r}."
            raise ValueError(message)
        if output_activation not in OUTPUT_ACTIVATIONS:
            message = f"output_activation must be one of {list(OUTPUT_ACTIVATIONS)}, not {output_activation!r}."
            raise ValueError(message)
        if placement not in PLACEMENTS:
            message = f"placement must be one of {list(PLACEMENTS)}, not {placement!r}."
            raise ValueError(message)
        self.placement = placement
        self.output_activation = output_activation
        self.amp = amp
        self.model = model
        self.method = get_method(method)
        self.class_names = list(class_names) if class_names is not None else None
        self.eval_mode = eval_mode
        self.update_batchnorm_stats = update_batchnorm_stats
        self._auto = isinstance(layer, str) and layer == "auto"
        self._layer: tuple[str, nn.Module] | None = None if self._auto else resolve_layer(model, layer)
        self._auto_logged: set[str] = set()
        self._spatial_dims = expected_spatial_dims(model)
        self._batched_vjp = True
        self.target: object = None  # what a call without target explains (None: "predicted")
        self.config: Config | None = None
        # the config's model's own preprocessing (a MONAI bundle's chain, an nnU-Net folder's; None: none), from
        # the model loader (medcam3d.models.load_configured / load_preprocessing), read once; unset: not read yet
        self._own_preprocessing: BundlePreprocessing | NnunetPreprocessing | None = None
        self._own_preprocessing_read = False

    @classmethod
    def from_config(cls, config: str | Path | Config, model: nn.Module | None = None, *, trust: bool = False,
                    **overrides: object) -> Explainer:
        """An explainer set up as a config says: its model, method, layer, classes and options.

        Parameters
        ----------
        config : path or Config
            A YAML config (:func:`medcam3d.config.load_config`) or a loaded one.
        model : nn.Module, optional
            The network, already loaded; default: the config's (its weights loaded with
            ``torch.load(weights_only=True)``; a MONAI bundle's network, class names and
            preprocessing), read by :func:`medcam3d.models.load_configured`, as the CLI reads it.
        trust : bool
            Passed to the model loader (code the config names that is not on the allow-list).
        **overrides
            Any :class:`Explainer` argument, over the config's (e.g. ``method="gradcam"``).

        Returns
        -------
        Explainer
            ``method``, ``layer``, ``class_names``, ``amp``, ``output_activation`` and ``placement``
            from the config; :attr:`target` (what a call without ``target`` explains) is the
            config's ``target``; :attr:`config` keeps the config (:meth:`preprocess` uses it, with
            a MONAI bundle's own preprocessing when the config gives no ``preprocessing`` list).
        """
        from .config import Config, load_config

        loaded = config if isinstance(config, Config) else load_config(config)
        own = None
        if model is None:
            from .models import load_configured

            configured = load_configured(loaded, trust=trust)
            loaded, model, own = configured.config, configured.model, configured
        options: dict[str, object] = dict(method=loaded.method, layer=loaded.layer, class_names=loaded.class_names,
                                          amp=loaded.amp, output_activation=loaded.output_activation,
                                          placement=loaded.placement)
        options.update(overrides)
        explainer = cls(model, **options)  # type: ignore[arg-type]
        explainer.target = loaded.target
        explainer.config = loaded
        if own is not None:  # the loader's preprocessing: preprocess() reads nothing again
            explainer._own_preprocessing, explainer._own_preprocessing_read = own.preprocessing, True
        return explainer

    def preprocess(self, image: object, *, volume: int | None = None, trust: bool = False):
        """Read and preprocess a scan as this explainer's config says (see :meth:`from_config`).

        The config's ``preprocessing`` list; without one, the model's own preprocessing as the CLI
        uses it, from the model loader (``ConfiguredModel.preprocessing``): a MONAI bundle's chain
        (:class:`medcam3d.preprocess_bundle.BundlePreprocessing`) or an nnU-Net folder's
        (:class:`medcam3d.preprocess_nnunet.NnunetPreprocessing`), read with the model by
        :meth:`from_config`, or read here once with ``trust`` (:func:`medcam3d.models.load_preprocessing`)
        when :meth:`from_config` was given the model; otherwise (or for a bundle that defines none)
        :data:`medcam3d.preprocess.DEFAULT_TRANSFORMS`.

        Parameters
        ----------
        image : path, list of paths, (array, Space) or MetaTensor
            As :func:`medcam3d.preprocess.preprocess` takes it (a bundle's chain takes a path, or a
            list of paths). A list of paths is one scan per input channel (MR sequences), stacked in
            order on the first one's grid (a channel on another grid is resampled onto it, with a
            :class:`~medcam3d.errors.ChannelGridWarning`); ``scanner_space`` is the first one's.
        volume : int, optional
            Volume index of a 4D file (not with a bundle's chain, which reads the whole file).
        trust : bool
            Read headers that point to data files elsewhere; transforms not on the allow-list; a
            bundle's configs (they run code).

        Returns
        -------
        (MetaTensor, Space)
            The model's input ``(C, *input_shape)`` (a call takes it with or without the batch
            axis) and the scan's own grid, ``scanner_space``.
        """
        from .preprocess import preprocess

        config = self.config
        if config is None:
            message = ("this explainer has no config to preprocess with: make it with Explainer.from_config(...), "
                       "or call medcam3d.preprocess.preprocess(image, transforms) yourself.")
            raise InputError(message)
        if config.preprocessing is None and not self._own_preprocessing_read:
            from .models import load_preprocessing

            self._own_preprocessing = load_preprocessing(config, trust=trust)  # as load_configured gives it
            self._own_preprocessing_read = True
        reader = self._own_preprocessing if config.preprocessing is None else None
        if reader is not None:
            if volume is not None:
                message = ("volume cannot be used with a bundle's own preprocessing (it reads the whole file); give the "
                           "config a preprocessing list instead.")
                raise InputError(message)
            return reader(image, trust=trust)  # type: ignore[arg-type]  # a bundle's chain takes a path
        return preprocess(image, config.preprocessing, volume=volume, trust=trust, source=config.source)

    def __repr__(self) -> str:
        layer = "auto" if self._auto else self._layer[0]  # type: ignore[index]
        return f"Explainer(model={type(self.model).__name__}, method={self.method.name!r}, layer={layer!r})"

    # ------------------------------------------------------------------ call
    def __call__(self, x: torch.Tensor, target: object = None, *, relu: bool = True) -> Explanation:
        """Explain a batch.

        Parameters
        ----------
        x : (B, C_in, *spatial) Tensor or MetaTensor
            Or one sample ``(C_in, *spatial)`` as a MetaTensor that is not a batch (``is_batch``
            False, as :meth:`preprocess` gives it) for a model whose spatial rank is known
            (:func:`medcam3d.input_rank.expected_spatial_dims`); a plain tensor needs its batch axis.
        target : int, str, list, "all", "predicted", Tensor, Region or Target
            What to explain (see :mod:`medcam3d.targets`); default :attr:`target` (the config's
            with :meth:`from_config`), else ``"predicted"``. A ``Region``
            mask is given on the model's output grid, or on the scan's grid with
            ``Region(classes, mask=m, space=scan_space)`` when ``x`` is a ``MetaTensor`` (its
            affine places the input; the mask is resampled with nearest neighbour).
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
            (:func:`medcam3d.model_io.to_model_input`).
        """
        dims = self._spatial_dims
        if dims is not None and getattr(x, "is_batch", True) is False and getattr(x, "ndim", 0) == dims + 1:
            x = x[None]  # one MetaTensor sample (MONAI's is_batch False, as preprocess gives it): the batch axis
        if target is None:
            target = self.target
        try:
            # The whole forward/backward/restore holds the model: concurrent calls serialize.
            with model_lock(self.model):
                try:
                    return self._explain(x, target, relu)
                except LayerError:
                    if not self._auto or not isinstance(x, torch.Tensor) or x.ndim < 3:
                        raise
                    # The choice was made on a probe; for this size it fails: choose on this size.
                    shape = tuple(int(s) for s in x.shape[1:])
                    used = auto_layer(self.model, shape).name
                    if auto_layer(self.model, shape, exact=True).name == used:
                        raise
                    return self._explain(x, target, relu)
        except torch.OutOfMemoryError as error:
            message = (
                f"Out of memory while explaining an input of shape {tuple(x.shape)} on {x.device}: {error}. "
                "Options: explain through sliding windows (medcam3d.sliding.explain_sliding_window / CLI --roi), use mixed precision "
                "(amp='bf16' / --amp bf16), a smaller batch, or the CPU (--device cpu)."
            )
            raise ExplainerMemoryError(message) from None

    def _explain(self, x: torch.Tensor, target: object, relu: bool) -> Explanation:
        inputs, input_affine = self._prepare_input(x)
        if self.method.level != "layer":  # input-level, multi-layer and perturbation methods: their own passes
            # the output's placement (output_field) comes with the pass over x (Pass.output_field)
            return self.method.explain(self, inputs, x, target, relu=relu, input_affine=input_affine)
        name, module = self._target_layer(inputs)
        autocast = torch.autocast(inputs.device.type, dtype=_AMP_DTYPES[self.amp], enabled=self.amp is not None)
        track = self.method.needs_gradients
        # The forward runs through a view of the model (shallow copies of its modules sharing its tensors):
        # the view's eval mode and hooks stay invisible to other threads calling the model meanwhile.
        state = isolated_model(self.model, eval_mode=self.eval_mode, restore_buffers=not self.update_batchnorm_stats,
                               hooked=[module])
        with contextlib.ExitStack() as stack:
            view = stack.enter_context(state)
            layer = counterpart(view, name, module)
            capture = ActivationCapture(layer, name, track_gradients=track, spatial_ndim=inputs.ndim, model=view)
            watch = (OutputActivationWatch(view, skip=[capture.intercepted]) if self.output_activation != "none"
                     else contextlib.nullcontext())
            stack.enter_context(capture)
            stack.enter_context(watch)
            stack.enter_context(autocast)
            with torch.no_grad(), forward_errors(self.model, inputs):  # no graph before the target layer; the
                outputs = capture.run(inputs)  # capture re-enables it
            activations = capture.activations
            if activations is None:
                message = (
                    f"Layer {name!r} did not run during the forward pass, so it cannot be explained. "
                    "Choose a layer on the path from input to output (see medcam3d.list_layers)."
                )
                raise LayerError(message)
            outputs = checked_outputs(outputs, name, track)
            logits, undone = logits_to_explain(outputs, capture, watch, self.output_activation, track, stacklevel=3)
            output_field = output_placement(self.model, inputs, logits, self.placement, stacklevel=4)
            resolved = resolve_target(target, logits, self.class_names, input_space=region_input_space(x, target, inputs),
                                      output_field=output_field)
            with torch.enable_grad():
                scores = resolved.scores(logits)
                gradients = self._gradients(scores, activations, name) if track else None
            context = MethodContext(resolved.class_indices, resolved.signs, self._head_weight(activations, logits))
            with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
                gradients = None if gradients is None else gradients.float()
                maps = self.method.combine(activations.detach().float().unsqueeze(1), gradients, context)
                if not self.method.class_specific:
                    maps = maps.expand(-1, resolved.num_targets, *maps.shape[2:])
                if relu:
                    maps = maps.clamp_min(0)
        placement, placed = self._placement(name, inputs)
        run = Pass(activations=[activations.detach()], gradients=None if gradients is None else [gradients], logits=logits.detach(),
                   undone=undone, target=resolved, scores=scores.detach(), output_field=output_field)
        return self._result(run, maps=maps, layer=name, relu=relu, input_shape=tuple(inputs.shape[2:]), input_affine=input_affine,
                            placement=placement, receptive_field=placed)

    def _pass(self, inputs: torch.Tensor, layers: Sequence[tuple[str, nn.Module]], target: object, *,
              x: object = None, track: bool = True, perturbed: bool = False) -> Pass:
        """One forward pass (and, with ``track``, one batched backward) for the methods beyond one layer.

        The same lean pass as for the CAM family: through a view of the model (its eval mode and hooks
        invisible to other threads), no graph before the first captured tensor, the output activation
        undone, the target resolved, all T gradients from one batched vector–Jacobian product.

        Parameters
        ----------
        inputs : (N, C_in, *spatial) Tensor
            On the model's device and dtype (a prepared input, or perturbed copies of it).
        layers : sequence of (name, module)
            Layers to capture (several: each stays in the graph of the earlier ones, so every gradient
            is the total derivative); empty: capture the input itself (input-level maps).
        target : object
            A target specification, or a resolved :class:`~medcam3d.targets.Target` (for perturbed
            copies: :func:`medcam3d.methods.passes.repeat_target` of the clean pass's).
        x : object, optional
            What the user passed, for a ``Region`` mask given on the scan's grid.
        track : bool
            Take gradients (False: a plain inference with the captures).
        perturbed : bool
            ``inputs`` are perturbed copies of an input already explained (noisy, occluded, masked,
            on a path from a baseline): the warnings about the output activation were given for that
            input, and are not repeated for its copies (whose outputs may look like probabilities).
        """
        autocast = torch.autocast(inputs.device.type, dtype=_AMP_DTYPES[self.amp], enabled=self.amp is not None)
        state = isolated_model(self.model, eval_mode=self.eval_mode, restore_buffers=not self.update_batchnorm_stats,
                               hooked=[module for _, module in layers])
        with contextlib.ExitStack() as stack:
            view = stack.enter_context(state)
            captures: list[ActivationCapture] | list[InputCapture]
            if layers:
                captures = [
                    ActivationCapture(counterpart(view, name, module), name, track_gradients=track,
                                      spatial_ndim=inputs.ndim, model=view, keep_graph=len(layers) > 1)
                    for name, module in layers
                ]
                if len(captures) > 1 and any(capture._script is not None for capture in captures):
                    message = (
                        f"Layers {[name for name, _ in layers]} include a layer inside a TorchScript graph; several layers "
                        "can be captured in one pass only where Python calls them. Explain the model before it is "
                        "scripted, or use one layer (e.g. method='hirescam')."
                    )
                    raise LayerError(message)
            else:
                captures = [InputCapture(view, track_gradients=track)]
            intercepted = [capture.intercepted for capture in captures if isinstance(capture, ActivationCapture)]
            watch = (OutputActivationWatch(view, skip=intercepted) if self.output_activation != "none"
                     else contextlib.nullcontext())
            for capture in captures:
                stack.enter_context(capture)
            stack.enter_context(watch)
            stack.enter_context(autocast)
            with torch.no_grad(), forward_errors(self.model, inputs):  # no graph before the first capture; the
                outputs = captures[0].run(inputs)  # captures re-enable it
            for capture in captures:
                if capture.activations is None:
                    message = (
                        f"Layer {capture.name!r} did not run during the forward pass, so it cannot be explained. "
                        "Choose a layer on the path from input to output (see medcam3d.list_layers)."
                    )
                    raise LayerError(message)
            outputs = checked_outputs(outputs, captures[0].name, track)
            with warnings.catch_warnings():
                if perturbed:
                    warnings.simplefilter("ignore", ProbabilityOutputWarning)
                logits, undone = logits_to_explain(outputs, captures[0], watch, self.output_activation, track, stacklevel=3)
            # once, in the pass over the user's input: the method's Explanation takes it from this Pass
            output_field = output_placement(self.model, inputs, logits, self.placement, stacklevel=4) if x is not None else None
            space = region_input_space(x, target, inputs) if x is not None else None
            resolved = resolve_target(target, logits, self.class_names, input_space=space,
                                      output_field=output_field if space is not None else None)
            tensors = [capture.activations for capture in captures if capture.activations is not None]
            with torch.enable_grad():
                scores = resolved.scores(logits)
                names = "+".join(capture.name for capture in captures)
                gradients = self._gradients_of(scores, tensors, names) if track else None
        return Pass(
            activations=[tensor.detach() for tensor in tensors],
            gradients=None if gradients is None else [gradient.float() for gradient in gradients],
            logits=logits.detach(),
            undone=undone,
            target=resolved,
            scores=scores.detach(),
            output_field=output_field,
        )

    def _result(self, run: Pass, **fields: object) -> Explanation:
        """The :class:`~medcam3d.explanation.Explanation` of ``run`` (the pass over the user's input) with this
        explainer's method and class names (:meth:`~medcam3d.explanation.Explanation.from_pass`)."""
        return Explanation.from_pass(run, method=self.method.name, class_names=self.class_names, **fields)  # type: ignore[arg-type]

    # --------------------------------------------------------------- helpers
    def _placement(self, layer: str, inputs: torch.Tensor) -> tuple[str, ReceptiveField | None]:
        """The placement of the layer's maps and its receptive field (:func:`medcam3d.placement.layer_placement`)."""
        return layer_placement(self.model, layer, inputs, self.placement, stacklevel=4)

    def _prepare_input(self, x: object) -> tuple[torch.Tensor, np.ndarray | None]:
        if torch.is_inference_mode_enabled():
            message = "Explaining needs autograd: call the explainer outside torch.inference_mode()."
            raise InferenceModeError(message)
        affine = getattr(x, "affine", None)
        # a copy: a view would change with the MetaTensor's affine (e.g. when its storage moves to shared memory)
        input_affine = None if affine is None else np.array(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
        dims = self._spatial_dims
        if isinstance(x, (torch.Tensor, np.ndarray)) and dims is not None:
            mismatch = rank_mismatch_message(dims, tuple(x.shape), batched=True)
            if mismatch is not None:  # before any cast, copy or forward
                raise InputError(mismatch)
        inputs = to_model_input(x, self.model)
        if inputs.ndim < 3:
            message = f"x must have shape (B, C_in, *spatial), not {tuple(inputs.shape)}."
            raise InputError(message)
        return inputs, input_affine

    def _target_layer(self, inputs: torch.Tensor) -> tuple[str, nn.Module]:
        if not self._auto:
            assert self._layer is not None
            return self._layer
        # One definition of "auto" (layers.auto_layer): chosen on a small probe and cached per model,
        # channels and rank (and per size, for a size where that choice failed).
        shape = tuple(inputs.shape[1:])
        info = auto_layer(self.model, shape)
        if info.name not in self._auto_logged:
            self._auto_logged.add(info.name)
            logger.info("layer='auto' uses %r (%s) for inputs %s", info.name, info.type, shape)
        return resolve_layer(self.model, info.name)

    def _gradients(self, scores: torch.Tensor, activations: torch.Tensor, layer: str) -> torch.Tensor:
        """``∂ scores[:, t] / ∂ activations`` for every t: ``(B, T, K, *spatial)``.

        All T vector–Jacobian products in one batched backward through the head
        (``is_grads_batched``); a loop where the network does not support it.
        """
        return self._gradients_of(scores, (activations,), layer)[0]

    def _gradients_of(self, scores: torch.Tensor, tensors: Sequence[torch.Tensor], layer: str) -> list[torch.Tensor]:
        """``∂ scores[:, t] / ∂ tensor`` for every t and every tensor (several captured layers, or the
        input): each ``(B, T, *tensor.shape[1:])``, from one (batched) backward for all of them. With
        several tensors, one that the scores do not depend on gets zeros."""
        targets = scores.shape[1]
        inputs = tuple(tensors)
        unused = len(inputs) > 1
        if not scores.requires_grad:
            message = f"The scores do not depend on layer {layer!r}; choose a layer on the path to the output."
            raise LayerError(message)

        def complete(found: Sequence[torch.Tensor | None], batched: bool) -> list[torch.Tensor]:
            out = []
            for tensor, gradient in zip(inputs, found):
                if gradient is None:
                    gradient = tensor.new_zeros(((targets,) if batched else ()) + tuple(tensor.shape))
                out.append(gradient)
            return out

        if targets == 1:
            found = torch.autograd.grad(scores[:, 0].sum(), inputs, allow_unused=unused)
            return [g.unsqueeze(1) for g in complete(found, False)]
        if self._batched_vjp:
            basis = torch.eye(targets, device=scores.device, dtype=scores.dtype)
            grad_outputs = basis.unsqueeze(1).expand(targets, scores.shape[0], targets)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # vmap fallback notices
                    found = torch.autograd.grad(scores, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                                retain_graph=True, allow_unused=unused)
                return [g.transpose(0, 1) for g in complete(found, True)]
            except RuntimeError as error:
                self._batched_vjp = False
                logger.info("Batched VJP not supported by this network (%s); looping over %d targets.", error, targets)
        rows: list[list[torch.Tensor]] = [[] for _ in inputs]
        for t in range(targets):
            found = torch.autograd.grad(scores[:, t].sum(), inputs, retain_graph=t < targets - 1, allow_unused=unused)
            for row, gradient in zip(rows, complete(found, False)):
                row.append(gradient)
        return [torch.stack(row, dim=1) for row in rows]

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
