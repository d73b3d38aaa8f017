"""Writes of :class:`medcam3d.monai.SaveHeatmapsd`: what one sample's write is, and a bounded queue of
writes run in a background thread.

The saver takes the maps from the prediction at once (a :class:`WritePlan`), so the evaluator may
change its data afterwards; :class:`BackgroundWrites` runs the plans one at a time in a worker
thread, lets at most ``max_pending`` wait, and hands back the files of the finished ones (raising
the first error, logging the others). At interpreter exit the errors of writes that nobody waited
for are logged (:func:`report_at_exit`).
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .scan_maps import ScanGridMap

__all__ = ["BackgroundWrites", "WritePlan", "nifti_source", "report_at_exit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WritePlan:
    """One sample's maps for :class:`~medcam3d.monai.SaveHeatmapsd` to write, and where."""

    subject: str
    views: list[ScanGridMap]
    folder: Path
    stem: str
    like: str | None  # the loaded NIfTI, whose header codes the maps copy


class BackgroundWrites:
    """Writes run one at a time in a background thread, at most ``max_pending`` of them waiting.

    Parameters
    ----------
    max_pending : int
        How many writes may wait before :meth:`submit` blocks (at least 1).
    """

    def __init__(self, max_pending: int) -> None:
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending!r}.")
        self.max_pending = int(max_pending)
        self._pool: ThreadPoolExecutor | None = None
        #: ``(subject, write)`` in submission order.
        self.pending: list[tuple[str, Future]] = []

    def submit(self, subject: str, write: Callable[[], list[Path]]) -> list[Path]:
        """Queue ``write`` (it returns the files it wrote); return the files of the writes finished so far.

        Blocks while ``max_pending`` writes wait; raises the first error of a finished write.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcam3d-heatmaps")
            atexit.register(report_at_exit, weakref.ref(self))  # a weak reference: savers can be collected
        written = self.collect(until=self.max_pending - 1)
        self.pending.append((subject, self._pool.submit(write)))
        return written

    def collect(self, until: int) -> list[Path]:
        """Files of the finished writes, waiting for the oldest until at most ``until`` are pending.

        Raises the first error of those writes (the others are logged).
        """
        written: list[Path] = []
        error: BaseException | None = None
        while self.pending and (len(self.pending) > until or self.pending[0][1].done()):
            subject, future = self.pending.pop(0)
            try:
                written += future.result()
            except Exception as failure:
                if error is None:
                    error = failure
                else:
                    logger.error("SaveHeatmapsd: the heatmaps of %r were not written: %s", subject, failure)
        if error is not None:
            raise error
        return written

    def report_errors(self) -> None:
        """Log the errors of writes that nobody waited for (at exit their threads have finished)."""
        for subject, future in self.pending:
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None:
                logger.error("SaveHeatmapsd: the heatmaps of %r could not be written: %s: %s", subject,
                             type(error).__name__, error)
        self.pending = []


def report_at_exit(writes: weakref.ref) -> None:
    """At interpreter exit: the unreported write errors of a :class:`BackgroundWrites` still alive."""
    alive = writes()
    if alive is not None:
        alive.report_errors()


def nifti_source(meta: Mapping) -> str | None:
    """The loaded file, when it is a NIfTI (its sform/qform codes are copied to the maps)."""
    name = meta.get("filename_or_obj")
    if isinstance(name, (str, os.PathLike)) and str(name).lower().endswith((".nii", ".nii.gz")) and Path(name).is_file():
        return str(name)
    return None
