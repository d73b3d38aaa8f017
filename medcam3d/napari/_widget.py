"""The *Explain* dock widget: a thin Qt shell around :mod:`._service`.

:class:`ExplainWidget` is a magicgui container that runs the service's step generators
(:func:`._service.explain_steps`, :func:`._masking.segment_steps`, :func:`._models.listing_steps`)
in worker threads (:mod:`._workers`: ``napari.qt.threading.thread_worker``, cancellable between
steps), shows their progress, adds their layers to the viewer and reports errors as napari
notifications; *Threshold to mask* (:func:`._masking.mask_steps`) runs in a worker too (progress,
*Cancel*).

Results never overwrite work: every mask is a new Labels layer (so napari's undo history of an
edited mask is never applied to another one), and heatmap names carry the scan, method, target
layer, class and probability (``case_01 · hirescam · class_layers.relu · bright_round (p=0.67)``).
Explaining the same thing again refreshes that heatmap in place; anything else gets its own layer.
"""

from __future__ import annotations

import functools
import logging
import weakref
from pathlib import Path
from typing import Any, cast

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton,
                              Select)

import medcam3d
from ._masking import THRESHOLD_METHODS, THRESHOLD_RANGE, mask_steps, segment_steps
from ._models import any_listing, cached_layers, input_channels, listing_steps
from ._results import add_result, apply_colour_scale
from ._service import ALL_CLASSES, AUTO, SCALES, explain_steps, is_foreign, layer_placement
from ._aids import ColourBars, bind_keys, jump_to_peak, toggle_isolines
from ._shared import Step, probability_text
from ._view import VIEWS, apply_display_style, follow_ndisplay, set_view
from ._workers import Failure, guarded, message, start
from ._writer import prefer_medcam3d_writers

__all__ = ["ExplainWidget", "DEMO_CONFIG"]

logger = logging.getLogger(__name__)

#: The demo config of a source checkout (preselected in the widget when present).
DEMO_CONFIG = Path(medcam3d.__file__).parent.parent / "configs" / "demo.yaml"


def _while_open(callback):
    """Skip a callback once the widget is closed (its Qt objects deleted, or torn down)."""

    @functools.wraps(callback)
    def wrapper(self, *args, **kwargs):
        if self._closed:
            return None
        try:
            return callback(self, *args, **kwargs)
        except RuntimeError as error:
            if "has been deleted" in str(error):
                logger.debug("medcam3d widget closed before its worker finished")
                return None
            raise

    return wrapper


class ExplainWidget(Container):
    """The *Explain* dock widget.

    Pick a scan (image layer), a config (the demo config when present), a method, a target layer,
    a class and the network's output activation (each defaults to the config's ``method``,
    ``layer``, ``target`` and ``output_activation``, as for ``medcam3d explain``; a layer or method
    the model lacks is refused with the command line's error), then *Explain*: the maps are computed in a worker thread (steps shown in the
    progress bar, *Cancel* stops after the current step) and added as one heatmap layer per class
    on the grid the scan is shown on, coloured per class on the chosen colour scale, with the
    model's field of view as an outline when the model does not see the whole scan. *Threshold
    to mask* turns the chosen heatmap into a new labels layer and a box (reported in mm), in a worker;
    *Segment* segments the chosen heatmap's class from the scan (:func:`._masking.segment_from_heatmap`, in a worker) into
    a new labels layer and lesion boxes. Errors become napari notifications.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Attributes
    ----------
    worker : GeneratorWorker or None
        The last explain worker (its ``finished`` signal ends a run).
    layers_worker : GeneratorWorker or None
        The last worker that listed target layers.
    mask_worker : GeneratorWorker or None
        The last *Threshold to mask* worker; :attr:`masked` holds the layers it added.
    segment_worker : GeneratorWorker or None
        The last *Segment* worker; :attr:`segmented` holds the layers it added.
    steps : list of Step
        The steps the last explanation reported so far.
    busy : bool
        True while a worker runs or a refresh is pending.
    """

    def __init__(self, napari_viewer: Any) -> None:
        from qtpy.QtCore import QTimer

        image_layer = ComboBox(label="image", tooltip="The scan to explain.")
        channels = Select(label="more channels", visible=False,
                          tooltip="The model takes several input channels (e.g. MR sequences): the scan above is "
                                  "channel 0; pick the other channels' image layers (in the layer list's order). "
                                  "A layer on another grid is resampled onto the scan's, with a warning.")
        config = FileEdit(label="config", mode=FileDialogMode.EXISTING_FILE, filter="*.yaml *.yml",
                          value=DEMO_CONFIG if DEMO_CONFIG.is_file() else None,
                          tooltip="medcam3d YAML config: model, class names, preprocessing.")
        from ..model_io import OUTPUT_ACTIVATIONS

        method = ComboBox(label="method", choices=list(medcam3d.METHODS), value="hirescam",
                          tooltip="Default: the config's method.")
        target_layer = ComboBox(label="target layer", choices=[AUTO],
                                tooltip="Default: the config's layer. 'auto': the last layer with a spatial output.")
        target_class = ComboBox(label="class", choices=[ALL_CLASSES], tooltip="Default: the config's target.")
        output_activation = ComboBox(label="output activation", choices=list(OUTPUT_ACTIVATIONS), value="auto",
                                     tooltip="What the network applies to its logits (default: the config's "
                                             "output_activation; auto detects a trailing Softmax/Sigmoid).")
        trust = CheckBox(text="trust model code (bundles, TorchScript)", value=False)
        scale = ComboBox(label="colour scale", choices=list(SCALES), value=SCALES[0],
                         tooltip="Shared scales make a faint map mean a weak map: compare classes and cases.")
        run_button = PushButton(text="Explain")
        cancel_button = PushButton(text="Cancel", enabled=False,
                                   tooltip="Stop Explain or Threshold after the current step; nothing is added.")
        buttons = Container(widgets=[run_button, cancel_button], layout="horizontal", labels=False)
        progress = ProgressBar(min=0, max=1, value=0, visible=False, label="")
        status = Label(value="")
        heatmap = ComboBox(label="heatmap")
        threshold_method = ComboBox(label="threshold", choices=list(THRESHOLD_METHODS), value="fraction")
        low, high, step, default = THRESHOLD_RANGE["fraction"]
        threshold_value = FloatSpinBox(label="value", value=default, min=low, max=high, step=step,
                                       tooltip="fraction of the maximum (0-1] or percentile (0-100)")
        keep_largest = CheckBox(text="largest component only", value=True)
        mask_button = PushButton(text="Threshold to mask")
        segment_button = PushButton(text="Segment", tooltip="Seed, expand, constrain (medcam3d.segment): the chosen "
                                                            "heatmap's class segmented from the scan, with lesion boxes.")
        mask_row = Container(widgets=[mask_button, segment_button], layout="horizontal", labels=False)
        box = Label(value="")
        views = [PushButton(text=plane.capitalize(), name=plane) for plane in VIEWS]
        view_row = Container(widgets=views, layout="horizontal", label="view", labels=False)
        peak_button = PushButton(text="Jump to peak", tooltip="Move the slices to the chosen heatmap's largest value "
                                                              "(key Shift-J: the selected heatmap's).")
        isolines_button = PushButton(text="Isolines on/off", tooltip="Draw the maps as isolines at 25, 50 and 75 % "
                                                                    "of their colour maximum, or filled (key Shift-I).")
        aid_row = Container(widgets=[peak_button, isolines_button], layout="horizontal", labels=False)
        super().__init__(widgets=[
            image_layer, channels, config, method, target_layer, target_class, output_activation, trust, scale, buttons,
            progress, status,
            Label(value="Threshold a heatmap into a mask:"), heatmap, threshold_method, threshold_value,
            keep_largest, mask_row, box, view_row, aid_row,
        ])
        self.colour_bars = ColourBars(napari_viewer)  # one bar per heatmap: class, method, p; fractions of the maximum
        self.native.layout().addWidget(self.colour_bars.native)
        self.peak_button, self.isolines_button = peak_button, isolines_button
        self._viewer = napari_viewer
        self._closed = False
        self.worker = None  # the last explain worker
        self.layers_worker = None
        self.steps: list[Step] = []
        self.mask_worker = None  # the last Threshold worker
        self.masked: list = []  # the layers the last Threshold added
        self.segment_worker = None  # the last Segment worker
        self.segmented: list = []  # the layers the last Segment added
        self._active: list = []  # started workers that have not finished yet
        self._status_token = 0  # bumped by each user change; late results do not overwrite newer status
        self._run_token = -1  # the status token of the last explanation
        self._warned: weakref.WeakSet = weakref.WeakSet()  # foreign layers already warned about
        self.image_layer, self.config, self.method = image_layer, config, method
        self.channels = channels
        self.input_channels = 1  # what the config's network takes (its in_channels)
        self.target_layer, self.target_class, self.trust, self.scale = target_layer, target_class, trust, scale
        self.output_activation = output_activation
        self.run_button, self.cancel_button, self.progress, self.status = run_button, cancel_button, progress, status
        self.heatmap, self.threshold_method, self.threshold_value = heatmap, threshold_method, threshold_value
        self.keep_largest, self.mask_button, self.segment_button, self.box = keep_largest, mask_button, segment_button, box
        for label in (status, box):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        # Choices are callables so that reset_choices() (napari calls it on layer events) keeps them.
        self._classes: list[str] = [ALL_CLASSES]
        self._layers: list[str] = [AUTO]
        # The config's defaults (medcam3d explain's): a method or layer the model lacks is offered as
        # it is, so that Explain refuses it as the command line does; targets that are no class name.
        self._methods: list[str] = list(medcam3d.METHODS)
        self._config_layer = AUTO
        self._targets: dict[str, object] = {}
        self.image_layer.choices = self._scan_choices
        self.channels.choices = self._channel_choices
        self.method.choices = self._method_choices
        self.heatmap.choices = self._heatmap_choices
        self.target_class.choices = self._class_choices
        self.target_layer.choices = self._layer_choices
        # Listing target layers waits for the event loop: a burst of layer events (opening
        # several files, or the viewer removing every layer while it closes) starts nothing.
        self._refresh_timer = QTimer(self.native)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self._refresh_target_layers)
        self.config.changed.connect(self._on_config_changed)
        self.image_layer.changed.connect(self._schedule_refresh)
        self.image_layer.changed.connect(lambda _=None: self.channels.reset_choices())  # the scan is no other channel
        self.trust.changed.connect(self._schedule_refresh)
        self.scale.changed.connect(self._on_scale_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.mask_button.changed.connect(self.make_mask)
        self.segment_button.changed.connect(self.make_segmentation)
        self.threshold_method.changed.connect(self._on_threshold_method)
        for button in views:
            button.changed.connect(lambda _=None, plane=button.name: set_view(self._viewer, plane))
        self.peak_button.changed.connect(self.jump_to_peak)
        self.isolines_button.changed.connect(lambda _=None: toggle_isolines(self._viewer))
        bind_keys(napari_viewer)
        events = napari_viewer.layers.events
        self._connections = [(event, self._on_layers_changed) for event in (events.inserted, events.removed,
                                                                           events.reordered)]
        for event, handler in self._connections:
            event.connect(handler)
        self.native.destroyed.connect(functools.partial(ExplainWidget._teardown, weakref.ref(self)))
        follow_ndisplay(napari_viewer)
        prefer_medcam3d_writers()
        self._on_config_changed(notify=False)

    # ---------------------------------------------------------------- teardown
    @staticmethod
    def _teardown(ref, *_args) -> None:
        """The Qt widget is gone: disconnect from the viewer and ask running workers to stop."""
        self = ref()
        if self is None:
            return
        self.close_workers(wait_ms=0)

    def close_workers(self, wait_ms: int = 0) -> None:
        """Stop reacting to the viewer, ask this widget's workers to quit, and wait up to ``wait_ms``.

        Called when the widget's Qt object is destroyed (the viewer closing); scripts may call it
        before ``viewer.close()``.
        """
        self._closed = True
        for event, handler in self._connections:
            try:
                event.disconnect(handler)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._connections = []
        for worker in list(self._active):
            worker.quit()
        if wait_ms > 0:
            from qtpy.QtCore import QThreadPool

            pool = QThreadPool.globalInstance()
            assert pool is not None  # Qt's global pool always exists
            pool.waitForDone(wait_ms)

    # ---------------------------------------------------------------- choices
    def _scan_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        images = [layer for layer in self._viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        scans = [layer for layer in images if (layer.metadata or {}).get("medcam3d") != "heatmap"]
        return [(layer.name, layer) for layer in scans]

    def _channel_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(name, layer) for name, layer in self._scan_choices() if layer is not self.image_layer.value]

    def _class_choices(self, _widget=None) -> list[str]:
        return self._classes

    def _method_choices(self, _widget=None) -> list[str]:
        return self._methods

    def _layer_choices(self, _widget=None) -> list[str]:
        return self._layers

    def _heatmap_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and (layer.metadata or {}).get("medcam3d") == "heatmap"]

    @_while_open
    def _on_layers_changed(self, _event=None) -> None:
        self.reset_choices()  # a changed scan choice schedules the listing (image_layer.changed)
        self.colour_bars.refresh()

    def jump_to_peak(self, _value=None):
        """Move the viewer's slices to the chosen heatmap's peak (:func:`._aids.jump_to_peak`); the peak in mm or None."""
        return jump_to_peak(self._viewer, self.heatmap.value)

    @_while_open
    def _schedule_refresh(self, _value=None) -> None:
        self._refresh_timer.start()

    def _config_path(self) -> Path | None:
        value = self.config.value
        if value is None or str(value) in ("", "."):
            return None
        path = Path(cast(Path, value))  # one file: the widget's mode is EXISTING_FILE
        return None if path.is_dir() else path

    def _set_status(self, text: str, token: int | None = None) -> None:
        """Show ``text`` unless it answers an older request than the current status (``token``)."""
        if token is None or token == self._status_token:
            self.status.value = text[:300]

    @_while_open
    def _on_config_changed(self, _value=None, *, notify: bool = True) -> None:
        from napari.utils.notifications import show_error

        from ..config import load_config

        self._status_token += 1
        names: list[str] = []
        config = None
        path = self._config_path()
        if path is None:
            self._set_status("choose a config file (a .yaml with the model, e.g. configs/demo.yaml)")
        else:
            try:
                config = load_config(path)
                names = list(config.class_names or [])
                self._set_status("")
            except Exception as error:
                text = f"medcam3d: {message(error)}"
                self._set_status(text)
                if notify:
                    show_error(text)
        self._targets = {}
        target = self._target_choice("all" if config is None else config.target, names)
        self._classes = [ALL_CLASSES, *names, *self._targets]
        self.target_class.reset_choices()
        self.target_class.value = target
        self.input_channels = (None if config is None else input_channels(config)) or 1
        self.channels.visible = self.input_channels > 1  # a multi-channel model: pick the other channels
        if config is not None:  # the config's defaults, as medcam3d explain takes them
            self._methods = list(medcam3d.METHODS) + ([config.method] if config.method not in medcam3d.METHODS else [])
            self.method.reset_choices()
            self.method.value = config.method
            self.output_activation.value = config.output_activation
            self._config_layer = config.layer
            self._layers = self._base_layers()
            self.target_layer.reset_choices()
            self.target_layer.value = config.layer
        self._schedule_refresh()

    def _target_choice(self, target: object, names: list[str]) -> str:
        """The class choice showing a config's ``target``; one that is no class name is added to
        :attr:`_targets` as it is (``predicted``, a list, an unknown class), for Explain to take or refuse."""
        if target in ("all", None):
            return ALL_CLASSES
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(names):
            return names[target]
        if isinstance(target, str) and target in names:
            return target
        text = ", ".join(map(str, target)) if isinstance(target, list) else str(target)
        self._targets[text] = target
        return text

    def _base_layers(self) -> list[str]:
        """``auto`` and the config's layer: the choices before the model's layers are listed."""
        return [AUTO] + ([self._config_layer] if self._config_layer != AUTO else [])

    def _placement(self, layer) -> tuple[np.ndarray, dict]:
        """:func:`layer_placement`, with a warning (once per layer) for layers from elsewhere."""
        from napari.utils.notifications import show_warning

        affine, metadata = layer_placement(layer)
        if is_foreign(layer) and layer not in self._warned:
            self._warned.add(layer)
            show_warning(f"medcam3d: {layer.name} was not opened by the medcam3d reader; its napari placement "
                         "(scale, translate, rotate, shear, affine) is used, with world axes taken as R, A, S in mm. "
                         "Open the file with the medcam3d reader for its true scanner placement.")
        return affine, metadata

    @_while_open
    def _refresh_target_layers(self, _value=None) -> None:
        from napari.qt.threading import thread_worker

        layer, path = self.image_layer.value, self._config_path()
        current = self.target_layer.value
        self._layers = self._base_layers()
        self.target_layer.reset_choices()
        if current in self._layers:
            self.target_layer.value = current
        if layer is None or path is None or self._closed:
            return
        affine, metadata = layer_placement(layer)
        trust = self.trust.value
        names = cached_layers(layer.data.shape, affine, path, trust=trust) or any_listing(path, trust)
        if names is not None:  # listed before (for this grid, or this model on another input size)
            self._show_layers(names, current)
            return
        worker = thread_worker(guarded, start_thread=False)(listing_steps, layer.data, affine, path, trust, metadata)
        request, token = (layer, path), self._status_token
        worker.returned.connect(lambda result: self._on_listed(result, request, token))
        self.layers_worker = worker
        self._start(worker)

    @_while_open
    def _on_listed(self, result, request: tuple, token: int) -> None:
        if (self.image_layer.value, self._config_path()) != request:
            return  # stale: the user changed the scan or config meanwhile
        if isinstance(result, Failure):
            self._set_status(f"cannot list layers: {message(result.error)}", token)
            return
        self._show_layers(result, self.target_layer.value)

    def _show_layers(self, names: list[str], current: str) -> None:
        self._layers = [AUTO, *names, *[name for name in self._base_layers()[1:] if name not in names]]
        self.target_layer.reset_choices()
        self.target_layer.value = current if current in self._layers else AUTO

    def _on_threshold_method(self, method: str) -> None:
        low, high, step, default = THRESHOLD_RANGE[method]
        self.threshold_value.range = (low, high)
        self.threshold_value.step = step
        self.threshold_value.value = default
        self.threshold_value.enabled = method != "otsu"

    @_while_open
    def _on_scale_changed(self, _value=None) -> None:
        apply_colour_scale(self._viewer, self.scale.value)
        self.colour_bars.refresh()

    # ---------------------------------------------------------------- explain
    def run(self, _value=None):
        """Explain the chosen scan in a worker thread; returns the worker (None on bad input)."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        layer, path = self.image_layer.value, self._config_path()
        if layer is None:
            show_error("medcam3d: no 3D image layer to explain; open a scan first "
                       "(File > Open, or File > Open Sample).")
            return None
        if path is None:
            show_error("medcam3d: choose a config file (a .yaml with the model, e.g. configs/demo.yaml).")
            return None
        affine, metadata = self._placement(layer)
        extra = [other for other in (self.channels.value or []) if other is not layer] if self.input_channels > 1 else []
        channels = [(other.data, *self._placement(other), other.name) for other in extra]
        choice = self.target_class.value
        target = "all" if choice == ALL_CLASSES else self._targets.get(choice, choice)
        worker = thread_worker(guarded, start_thread=False)(
            explain_steps, layer.data, affine, path, method=self.method.value, layer=self.target_layer.value,
            target=target, name=layer.name, metadata=metadata, trust=self.trust.value, device="auto",
            output_activation=self.output_activation.value, channels=channels,
        )
        self._status_token += 1
        token = self._run_token = self._status_token
        worker.yielded.connect(self._on_step)
        request = (tuple(layer.data.shape), affine, path, self.trust.value)
        worker.returned.connect(lambda result: self._on_explained(result, layer.name, token, request))
        worker.aborted.connect(lambda: self._on_cancelled(layer.name, token))
        worker.finished.connect(self._on_finished)
        self.steps = []
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value, self.progress.visible = 1, 0, True
        self._set_status(f"explaining {layer.name} with {self.method.value}...")
        self.worker = worker
        self._start(worker)
        return worker

    def cancel(self, _value=None) -> None:
        """Ask the running explanation and threshold to stop after their current step (``worker.quit()``)."""
        if self.worker is not None and self.worker in self._active:
            self.worker.quit()
            self.cancel_button.enabled = False
            self._set_status("cancelling after the current step...")
        if self.mask_worker is not None and self.mask_worker in self._active:
            self.mask_worker.quit()
            self.cancel_button.enabled = False
            self.box.value = "cancelling the threshold after the current step..."

    def _start(self, worker) -> None:
        start(worker, self._active)

    @property
    def busy(self) -> bool:
        """True while an explanation or a layer listing runs, or a listing is about to start."""
        try:
            pending = self._refresh_timer.isActive()
        except RuntimeError:  # the Qt timer was deleted with the widget
            pending = False
        return bool(self._active) or pending

    @_while_open
    def _on_step(self, step: Step) -> None:
        self.steps.append(step)
        self.progress.max = max(step.total, 1)
        self.progress.value = min(step.done, step.total)
        self.progress.label = step.text
        if self.cancel_button.enabled:
            self._set_status(f"step {step.done + 1}/{step.total}: {step.text}", self._run_token)

    @_while_open
    def _on_finished(self) -> None:
        self.run_button.enabled = True
        if self.mask_worker is None or self.mask_worker not in self._active:  # no threshold under way
            self.cancel_button.enabled = False
            self.progress.visible = False

    @_while_open
    def _on_cancelled(self, name: str, token: int) -> None:
        self._set_status(f"cancelled: {name} was not explained", token)

    @_while_open
    def _on_explained(self, result, name: str, token: int, request: tuple) -> None:
        from napari.utils.notifications import show_error, show_warning

        if isinstance(result, Failure):
            text = f"medcam3d could not explain {name}: {message(result.error)}"
            self._set_status(text, token)
            show_error(text)
            return
        added = [add_result(self._viewer, *item) for item in result]
        heatmaps = [layer for layer in added if layer.metadata.get("medcam3d") == "heatmap"]
        for note in heatmaps[0].metadata.get("channel_notes", []) if heatmaps else []:
            show_warning(f"medcam3d: {note}")  # a channel on another grid, resampled onto the scan's
        apply_colour_scale(self._viewer, self.scale.value)
        apply_display_style(self._viewer)
        self.reset_choices()
        self.colour_bars.refresh()
        if heatmaps:
            self.heatmap.value = heatmaps[0]
        shape, affine, path, trust = request
        listed = cached_layers(shape, affine, path, trust=trust)  # the explanation listed them on its input
        if listed is not None and self.image_layer.value is not None and \
                tuple(self.image_layer.value.data.shape) == shape and self._config_path() == path:
            self._show_layers(listed, self.target_layer.value)
        parts = []
        for layer in heatmaps:
            meta = layer.metadata
            p = meta.get("probability")
            peak = "no peak (flat map)" if meta["peak_mm"] is None else \
                "peak (" + ", ".join(f"{v:.0f}" for v in meta["peak_mm"]) + ") mm"
            probability = "" if p is None else f"p={probability_text(p)}, "
            parts.append(f"{meta['class']}: {probability}{peak}")
        where = "" if not heatmaps or heatmaps[0].metadata.get("fov_covers_scan") else \
            "; outline: the model's field of view (no map outside it)"
        self._set_status(f"layer {heatmaps[0].metadata['layer'] if heatmaps else '?'}; " + "; ".join(parts) + where,
                         token)

    # ---------------------------------------------------------------- mask
    def make_mask(self, _value=None):
        """Threshold the chosen heatmap into a new labels layer (and its box) in a worker thread.

        Runs :func:`._masking.mask_steps` off the UI thread (steps in the progress bar, *Cancel*
        stops it between steps and adds nothing); its ``returned`` signal adds the layers, which
        :attr:`masked` then holds. Returns the worker (None on bad input).
        """
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        heat = self.heatmap.value
        if heat is None:
            self.box.value = ""
            show_error("medcam3d: no heatmap layer to threshold; run Explain first.")
            return None
        method, value = self.threshold_method.value, float(self.threshold_value.value)
        try:
            affine, metadata = layer_placement(heat)
        except Exception as error:
            self.box.value = ""  # no stale box from an earlier threshold
            show_error(f"medcam3d: cannot threshold {heat.name}: {message(error)}")
            return None
        name = heat.name
        worker = thread_worker(guarded, start_thread=False)(
            mask_steps, heat.data, affine, method, value, keep_largest=self.keep_largest.value, name=name,
            metadata=metadata)
        worker.yielded.connect(self._on_task_step)
        worker.returned.connect(lambda result: self._on_masked(result, name))
        worker.aborted.connect(lambda: self._on_mask_cancelled(name))
        worker.finished.connect(self._on_mask_finished)
        self.masked = []
        self.mask_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value, self.progress.visible = 1, 0, True
        self.box.value = f"thresholding {name}..."
        self.mask_worker = worker
        self._start(worker)
        return worker

    @_while_open
    def _on_task_step(self, step: Step) -> None:
        """Progress of a threshold (the Explain steps have :meth:`_on_step`)."""
        self.progress.max = max(step.total, 1)
        self.progress.value = min(step.done, step.total)
        self.progress.label = step.text

    @_while_open
    def _on_mask_cancelled(self, name: str) -> None:
        self.box.value = f"cancelled: {name} was not thresholded"

    @_while_open
    def _on_mask_finished(self) -> None:
        self.mask_button.enabled = True
        if self.worker is None or self.worker not in self._active:  # no explanation under way
            self.cancel_button.enabled = False
            self.progress.visible = False

    @_while_open
    def _on_masked(self, result, name: str) -> None:
        from napari.utils.notifications import show_error

        if isinstance(result, Failure):
            self.box.value = ""  # no stale box from an earlier threshold
            show_error(f"medcam3d: cannot threshold {name}: {message(result.error)}")
            return
        added = [add_result(self._viewer, *item) for item in result]
        self.masked = added
        box = result[0][1]["metadata"]["box"]
        if box is None:
            self.box.value = f"{added[0].name}: empty (no voxel above the threshold)"
        else:
            size = " x ".join(f"{v:.1f}" for v in box["size_mm"])
            centre = ", ".join(f"{v:.1f}" for v in box["centre_mm"])
            self.box.value = f"{added[0].name}: box {size} mm, centre ({centre}) mm RAS, {box['voxels']} voxels"

    # ---------------------------------------------------------------- segment
    def make_segmentation(self, _value=None):
        """Segment the chosen heatmap's class from the chosen scan in a worker thread
        (:func:`._masking.segment_steps`) into a new labels layer on the scan's grid, with a shapes
        layer of the lesion boxes; returns the worker (None on bad input). Its ``returned`` signal
        adds the layers; :attr:`segmented` then holds them."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        heat, scan = self.heatmap.value, self.image_layer.value
        if heat is None or scan is None:
            self.box.value = ""
            show_error("medcam3d: no heatmap layer to segment from; run Explain first." if heat is None else
                       "medcam3d: no 3D image layer to segment; open a scan first.")
            return None
        try:
            scan_affine, scan_metadata = self._placement(scan)
            affine, metadata = layer_placement(heat)
        except Exception as error:
            self.box.value = ""
            show_error(f"medcam3d: cannot segment {scan.name} from {heat.name}: {message(error)}")
            return None
        names = (scan.name, heat.name)
        worker = thread_worker(guarded, start_thread=False)(
            segment_steps, scan.data, scan_affine, heat.data, affine, scan_name=scan.name, name=heat.name,
            metadata=metadata, scan_metadata=scan_metadata)
        worker.returned.connect(lambda result: self._on_segmented(result, names))
        worker.finished.connect(self._on_segment_finished)
        self.segmented = []
        self.segment_button.enabled = False
        self.box.value = f"segmenting {scan.name}..."
        self.segment_worker = worker
        self._start(worker)
        return worker

    @_while_open
    def _on_segment_finished(self) -> None:
        self.segment_button.enabled = True

    @_while_open
    def _on_segmented(self, result, names: tuple[str, str]) -> None:
        from napari.utils.notifications import show_error

        if isinstance(result, Failure):
            logger.debug("medcam3d segmentation failed", exc_info=result.error)
            self.box.value = ""  # no stale report from an earlier mask
            show_error(f"medcam3d: cannot segment {names[0]} from {names[1]}: {message(result.error)}")
            return
        added = [add_result(self._viewer, *item) for item in result]
        self.segmented = added
        lesions = result[0][1]["metadata"]["lesions"]
        if not lesions:
            self.box.value = f"{added[0].name}: no lesion found"
        else:
            boxes = "; ".join(" x ".join(f"{v:.1f}" for v in lesion["box"]["size_mm"]) + " mm, centre (" +
                              ", ".join(f"{v:.1f}" for v in lesion["box"]["centre_mm"]) + ") mm RAS" for lesion in lesions)
            self.box.value = f"{added[0].name}: {len(lesions)} lesion(s): {boxes}"
