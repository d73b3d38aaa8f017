"""Work off napari's UI thread: step generators run in worker threads, and the *Opening* panel.

- :func:`guarded` runs a step generator (one that yields :class:`._shared.Step` and returns a
  result) so that an exception becomes a :class:`Failure` result, reported as a notification on
  the UI thread instead of a traceback;
- :func:`start` starts a worker and keeps it in :data:`RUNNING` until it ends: at exit every
  worker still running is asked to quit and waited for, so that no worker thread outlives the Qt
  objects it reports to (Qt aborts the process otherwise);
- :func:`open_in_background` reads files in a worker (the reader's :func:`._reader.read_steps`)
  with a small docked panel (progress bar, *Cancel*), and adds the layers to the viewer when
  they are read; cancelled, it adds nothing.

Workers are napari's ``thread_worker`` (superqt's): their ``yielded``/``returned``/``aborted``/
``finished`` signals run on the UI thread, and ``quit()`` stops a generator at its next step.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ._shared import Step

__all__ = ["Failure", "guarded", "start", "message", "open_in_background", "RUNNING"]

logger = logging.getLogger(__name__)

#: Workers started by the plugin that have not finished (quit and waited for at exit).
RUNNING: set = set()


@dataclass(frozen=True)
class Failure:
    """An error caught in a worker, reported as a notification instead of a traceback."""

    error: BaseException


def guarded(function: Callable[..., Generator[Any, Any, Any]], *args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
    """Run a step generator in a worker: pass its steps on, return its result or a :class:`Failure`."""
    try:
        result = yield from function(*args, **kwargs)
    except Exception as error:  # reported to the user, the viewer keeps running
        logger.debug("medcam3d worker failed", exc_info=True)
        return Failure(error)
    return result


def message(error: BaseException) -> str:
    """One line for a notification: medcam3d's own errors say what was wrong; others name their type."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (ValueError, OSError, LookupError)):
        return text
    return f"{type(error).__name__}: {text}"


def start(worker: Any, active: list | None = None) -> Any:
    """Start ``worker`` and keep it in :data:`RUNNING` (and in ``active``) until it finishes."""
    RUNNING.add(worker)
    if active is not None:
        active.append(worker)

    def forget() -> None:
        RUNNING.discard(worker)
        if active is not None and worker in active:
            active.remove(worker)

    worker.finished.connect(forget)
    worker.start()
    return worker


@atexit.register
def _stop_workers() -> None:
    if not RUNNING:
        return
    for worker in list(RUNNING):
        worker.quit()
    try:
        from qtpy.QtCore import QThreadPool

        pool = QThreadPool.globalInstance()
        assert pool is not None  # Qt's global pool always exists
        pool.waitForDone(120_000)
    except Exception:  # pragma: no cover - Qt already gone
        logger.debug("could not wait for medcam3d workers", exc_info=True)


def open_in_background(viewer: Any, steps: Generator[Step, None, list[tuple]], name: str) -> Any:
    """Run ``steps`` (a reader's step generator) in a worker; add its layers to ``viewer`` when done.

    A panel docked on the right shows the step under way and a *Cancel* button (the reading stops
    at its next step and no layer is added); errors become notifications. The panel goes away
    when the worker ends.

    Parameters
    ----------
    viewer : napari.Viewer
    steps : generator of Step, returning a list of layer data tuples
        E.g. :func:`._reader.read_steps`.
    name : str
        What is opened (the files' names), for the panel and the messages.

    Returns
    -------
    GeneratorWorker
        Started; ``viewer.window`` keeps its panel as ``worker.panel``.
    """
    from magicgui.widgets import Container, Label, ProgressBar, PushButton
    from napari.layers import Layer
    from napari.qt.threading import thread_worker
    from napari.utils.notifications import show_error, show_info

    status = Label(value=f"reading {name}...")
    progress = ProgressBar(min=0, max=1, value=0, label="")
    cancel = PushButton(text="Cancel", tooltip="Stop reading; nothing is opened.")
    panel: Container = Container(widgets=[status, progress, cancel], labels=False)
    status.native.setWordWrap(True)
    dock = viewer.window.add_dock_widget(panel, name=f"medcam3d: opening {name}", area="right")

    worker = thread_worker(guarded, start_thread=False)(lambda: steps)
    worker.panel = panel

    def on_step(step: Step) -> None:
        progress.max = max(step.total, 1)
        progress.value = min(step.done, step.total)
        status.value = f"step {step.done + 1}/{step.total}: {step.text}"

    def on_returned(result: Any) -> None:
        if isinstance(result, Failure):
            show_error(f"medcam3d could not open {name}: {message(result.error)}")
            return
        for data, kwargs, kind in result:
            viewer.add_layer(Layer.create(data, kwargs, kind))

    def on_cancel() -> None:
        worker.quit()
        cancel.enabled = False
        status.value = f"cancelling: {name} will not be opened..."

    def on_finished() -> None:
        try:
            viewer.window.remove_dock_widget(dock)
        except (RuntimeError, LookupError, AttributeError):  # the viewer closed meanwhile
            logger.debug("opening panel already gone", exc_info=True)

    worker.yielded.connect(on_step)
    worker.returned.connect(on_returned)
    worker.aborted.connect(lambda: show_info(f"medcam3d: cancelled, {name} was not opened"))
    worker.finished.connect(on_finished)
    cancel.changed.connect(on_cancel)
    return start(worker)
