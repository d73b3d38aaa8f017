"""Cohorts: many scans, resumable, across processes and machines (``torchrun``).

Each process (rank) takes every ``world_size``-th case and runs three stages at once: DataLoader
workers read and preprocess the next scans, the process itself runs the engine on the current
one (:meth:`~medcam3d.jobs.runner.Runner.explain_case`), and a writer process writes the case
before it (:meth:`~medcam3d.jobs.runner.Runner.write_case`: scan-grid maps, boxes, masks,
pictures). Each case folder is written atomically; a case whose folder exists is skipped with
``resume``.
Rank 0 merges the rows of all ranks into one ``summary.csv`` in input order. Launch::

    torchrun --nproc_per_node 2 -m medcam3d batch --config C --inputs DIR --out OUT [--resume]

gloo is used on CPU, NCCL on GPU (one GPU per local rank).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import multiprocessing
import os
import queue
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .._signals import worker_init
from .case_loading import load_case
from .cases import Case
from .lock import output_lock
from .outputs import check_output_location, check_own_files, own_file_kind, record_own_files, remove_stale_staging
from .report import unescape_row, write_csv
from .runner import Runner

logger = logging.getLogger(__name__)

__all__ = ["DistributedContext", "distributed_context", "run_cohort"]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def distributed_context(device: str = "auto") -> DistributedContext:
    """Read torchrun's environment and join the process group (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    context = DistributedContext(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if context.distributed and not torch.distributed.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(context.local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return context


class _CaseDataset(torch.utils.data.Dataset):
    """Reads and preprocesses one case per item, in a worker; errors are returned, not raised."""

    def __init__(self, cases: Sequence[Case], transforms, trust: bool = False, reader=None, model=None,
                 input_check=None) -> None:
        self.cases = list(cases)
        self.transforms = transforms
        self.trust = trust
        self.reader = reader
        self.model = model
        self.input_check = input_check

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        try:
            inputs = case.identity()  # before reading: recorded for resume
            loaded = load_case(case.scan, self.transforms, case.mask, trust=self.trust, volume=case.volume,
                               series=case.series, reader=self.reader, model=self.model, region_mask=case.region_mask,
                               input_check=self.input_check)
            return {"case": case, "loaded": _as_tensors(loaded), "error": "", "inputs": inputs}
        except Exception as error:  # reported by the main process, the cohort goes on
            return {"case": case, "loaded": None, "error": f"{type(error).__name__}: {error}"}


_SCAN_ARRAYS = ("scan", "labels", "region")  # a LoadedCase's arrays on the scan's grid


def _as_tensors(loaded, shared=None):
    """The case's arrays as tensors: a DataLoader (or a queue) hands tensors over in shared memory,
    while numpy arrays are pickled through a pipe (about 2 s for a 512x512x300 float32 CT).

    ``shared`` is the same case as the DataLoader handed it over: an array that views one of its
    tensors is sent as that tensor, already in shared memory (a new tensor over the same memory
    would be copied into fresh shared memory, 300 MB for a CT).
    """

    def as_tensor(name: str):
        array = getattr(loaded, name)
        if not isinstance(array, np.ndarray):
            return array
        original = getattr(shared, name, None)
        if isinstance(original, torch.Tensor) and original.is_shared() and array.size \
                and array.__array_interface__["data"][0] == original.data_ptr() and array.shape == tuple(original.shape):
            return original
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError):  # a dtype torch lacks, or a read-only array: sent as is
            return array

    return dataclasses.replace(loaded, **{name: as_tensor(name) for name in _SCAN_ARRAYS})


def _as_arrays(loaded):
    """Undo :func:`_as_tensors` (no copy: the arrays view the shared memory)."""
    if loaded is None:
        return None
    plain = {name: value.numpy() for name in _SCAN_ARRAYS
             if isinstance(value := getattr(loaded, name), torch.Tensor)}
    return dataclasses.replace(loaded, **plain) if plain else loaded


def _write_loop(runner: Runner, jobs, done, parent: int) -> None:
    """The writer process: write the explained cases that ``jobs`` brings until ``None``; report each on ``done``.

    Forked from the cohort's process, so it holds the same :class:`Runner` (its model is not used).
    It leaves when its parent is gone. Ctrl-C interrupts the case it is writing (whose staging
    folder is removed, as in the main process).
    """
    torch.set_num_threads(1)
    try:
        while True:
            try:
                job = jobs.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if job is None:
                return
            index, explained = job
            try:
                row = runner.write_case(dataclasses.replace(explained, loaded=_as_arrays(explained.loaded))).row()
                done.put((index, row, ""))
            except Exception as error:  # reported by the main process, the cohort goes on
                done.put((index, None, f"{type(error).__name__}: {error}"))
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, see medcam3d._signals) reaches the whole process group
        done.cancel_join_thread()  # leave now: the main process reports the interruption, nobody reads `done`
        return


class _CaseWriter:
    """Writes explained cases in a forked process while this process explains the next ones.

    At most one case waits while another is written, so a slow disk holds back the engine instead
    of filling memory. Without ``fork`` (Windows; macOS, where forking is unsafe) cases are written
    here, one after the other.
    """

    def __init__(self, runner: Runner, background: bool) -> None:
        self.runner = runner
        self.finished: list[tuple[int, dict | None, str]] = []
        self.pending: dict[int, tuple[Path, str]] = {}  # index -> (out_dir, case id) of queued cases
        self.process = None
        if background and sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
            import torch.multiprocessing  # noqa: F401  (tensors travel through queues in shared memory)

            context = multiprocessing.get_context("fork")
            self.jobs = context.Queue(maxsize=1)
            self.done = context.Queue()
            self.process = context.Process(target=_write_loop, args=(runner, self.jobs, self.done, os.getpid()),
                                           name="medcam3d-writer", daemon=True)
            self.process.start()

    def submit(self, index: int, explained, shared=None) -> None:
        """Write ``explained`` (an :class:`~medcam3d.jobs.case_result.ExplainedCase`) in the writer, or here
        when there is none (or it has ended). ``shared``: its case as the DataLoader handed it over."""
        if self.process is not None:
            job = (index, dataclasses.replace(explained, loaded=_as_tensors(explained.loaded, shared)))
            while self.process is not None:
                try:
                    self.jobs.put(job, timeout=1.0)
                    self.pending[index] = (explained.out_dir, explained.result.case_id)
                    return
                except queue.Full:
                    self._check_alive()
        try:
            self.finished.append((index, self.runner.write_case(explained).row(), ""))
        except Exception as error:
            self.finished.append((index, None, f"{type(error).__name__}: {error}"))

    def collect(self, wait: bool = False) -> list[tuple[int, dict | None, str]]:
        """The cases written since the last call; with ``wait``, every submitted case."""
        if self.process is not None:
            while self.pending:
                try:
                    index, row, error = self.done.get(timeout=1.0 if wait else 0.01)
                except queue.Empty:
                    self._check_alive()
                    if not wait:
                        break
                    continue
                self.pending.pop(index, None)
                self.finished.append((index, row, error))
        finished, self.finished = self.finished, []
        return finished

    def _check_alive(self) -> None:
        if self.process is not None and not self.process.is_alive():
            code = self.process.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            lost = sorted(self.pending)
            for out_dir, case_id in self.pending.values():  # the staging folder of the case it was writing
                remove_stale_staging(out_dir, case_id)
            self.pending.clear()
            self.finished += [(index, None, f"the writer process ended ({why}; out of memory?) before writing "
                                            "this case; run the batch again with --resume") for index in lost]
            logger.warning("The writer process ended (%s); the remaining cases are written by this process.", why)
            for channel in (self.jobs, self.done):  # nothing will read them: don't wait for their buffers at exit
                channel.cancel_join_thread()
            self.process = None

    def close(self) -> None:
        """Let the writer finish and leave (or stop it, after an interruption)."""
        if self.process is None:
            return
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.jobs.put(None, timeout=5.0)
        self.process.join(timeout=30.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5.0)
        if self.process.is_alive():  # it ignores SIGTERM once it is stopping: don't let the exit wait for it
            self.process.kill()
            self.process.join(timeout=5.0)
        for channel in (self.jobs, self.done):  # nothing more is read or written: exit without flushing them
            channel.cancel_join_thread()
        self.process = None


@contextlib.contextmanager
def _threads_beside_workers(workers: int):
    """Leave a core to each DataLoader worker while the cohort runs.

    The workers read and preprocess the next scans while this process explains the current one;
    if this process also keeps a thread on every core, torch's thread pool stalls whenever a core
    is taken (measured on 2 cores with 1 worker: the engine 3.5x slower, a CT cohort 1.3x slower
    in all). Torch's threads are restored afterwards; they are only ever reduced.
    """
    if workers < 1:
        yield
        return
    previous = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(max(1, min(previous, per_process - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _first(items: list) -> object:
    return items[0]


def _merge_summary(path: Path, rows: list[dict]) -> list[dict]:
    """This run's rows after the rows of an earlier run's ``summary.csv`` for other cases (kept in order).

    Only a ``summary.csv`` that ``batch`` wrote (listed unchanged in the output folder's manifest,
    see :func:`~medcam3d.jobs.outputs.own_file_kind`) is merged; a user's own is never read.
    """
    if own_file_kind(path.parent, path.name) != "batch":
        return rows
    ours = {row.get("case") for row in rows}
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            earlier = [row for row in map(unescape_row, csv.DictReader(stream)) if row.get("case") not in ours]
    except (OSError, UnicodeDecodeError, csv.Error):
        return rows
    return earlier + rows


def _write_summary(out: Path, rows: list[dict]) -> None:
    """``OUT/summary.csv``: the earlier run's rows of other cases, then ``rows``; listed as medcam3d's own."""
    write_csv(out / "summary.csv", _merge_summary(out / "summary.csv", rows))
    record_own_files(out, ["summary.csv"], "batch")


def run_cohort(
    runner: Runner,
    cases: Sequence[Case],
    out: Path,
    *,
    resume: bool = False,
    workers: int = 1,
    progress: bool = True,
    context: DistributedContext | None = None,
    background_writer: bool = True,
) -> tuple[list[dict], int, int]:
    """Explain this rank's share of ``cases`` into ``out``; merge the summary on rank 0.

    ``background_writer`` writes each case in a second process while the next case is explained
    (Linux; elsewhere, and with ``False``, cases are written in this process).

    Returns
    -------
    (rows, failures, skipped)
        On rank 0 the rows of all ranks in input order (other ranks: their own), the number of
        failed cases and of cases skipped by ``resume`` (over all ranks).

    Raises
    ------
    OutputConflictError
        ``out`` contains an input or lies inside an input folder, another medcam3d job is writing
        into it (see :mod:`medcam3d.jobs.lock`), or it holds a ``summary.csv`` that medcam3d did
        not write; nothing is written then.
    """
    context = context or DistributedContext()
    out = check_output_location(out, [p for case in cases for p in (*case.inputs, case.mask, case.region_mask)])
    with output_lock(out, "batch", context=context, check=lambda: check_own_files(out, ["summary.csv"])):
        return _run_cohort(runner, cases, out, resume=resume, workers=workers, progress=progress, context=context,
                           background_writer=background_writer)


def _run_cohort(runner: Runner, cases: Sequence[Case], out: Path, *, resume: bool, workers: int, progress: bool,
                context: DistributedContext, background_writer: bool) -> tuple[list[dict], int, int]:
    """:func:`run_cohort` under the output lock, ``out`` checked and created."""
    from monai.data import DataLoader
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)  # made by rank 0; other ranks may be on other machines
    mine = [(index, case) for index, case in enumerate(cases) if index % context.world_size == context.rank]
    rows: dict[int, dict] = {}
    skipped = 0
    todo = []
    for index, case in mine:
        done = runner.is_done(out, case) if resume else None
        if done is not None:
            rows[index] = done.row()
            skipped += 1
        else:
            todo.append((index, case))
    loader = DataLoader(_CaseDataset([case for _, case in todo], runner.transforms, runner.trust, runner.reader,
                                     runner.model, runner.input_check), batch_size=1,
                        num_workers=workers, collate_fn=_first, worker_init_fn=worker_init)
    failures = 0
    bar = tqdm(total=len(todo), desc=f"explaining (rank {context.rank})" if context.distributed else "explaining",
               unit="case", file=sys.stderr, disable=not progress or context.rank != 0)
    ids = {index: case for index, case in todo}

    def record(finished: list[tuple[int, dict | None, str]]) -> None:
        nonlocal failures
        for index, row, error in finished:
            if row is None:
                failures += 1
                row = {"case": ids[index].id, "image": str(ids[index].image), "status": "error", "error": error}
            rows[index] = row
            bar.update()
        if finished and not context.distributed:
            _write_summary(out, [rows[i] for i in sorted(rows)])

    writer = _CaseWriter(runner, background_writer)
    try:
        with _threads_beside_workers(workers):
            for (index, case), item in zip(todo, loader):
                try:
                    if item["error"]:
                        raise RuntimeError(item["error"])
                    explained = runner.explain_case(case.scan, out, case_id=case.id, mask=case.mask,
                                                    loaded=_as_arrays(item["loaded"]), region_mask=case.region_mask,
                                                    volume=case.volume, series=case.series, inputs=item["inputs"])
                except ConfigError:  # the config does not fit the model (e.g. class_names): every case would fail
                    raise
                except Exception as error:  # recorded; the cohort goes on
                    message = str(error) if isinstance(error, RuntimeError) and item["error"] else f"{type(error).__name__}: {error}"
                    record([(index, None, message)])
                    continue
                writer.submit(index, explained, shared=item["loaded"])
                record(writer.collect())
            record(writer.collect(wait=True))
    finally:
        writer.close()
    bar.close()
    if context.distributed:
        gathered: list = [None] * context.world_size
        torch.distributed.all_gather_object(gathered, (rows, failures, skipped))
        rows = {index: row for part, _, _ in gathered for index, row in part.items()}
        failures = sum(part[1] for part in gathered)
        skipped = sum(part[2] for part in gathered)
        if context.rank == 0:
            _write_summary(out, [rows[i] for i in sorted(rows)])
        torch.distributed.barrier()
    else:
        _write_summary(out, [rows[i] for i in sorted(rows)])
    return [rows[i] for i in sorted(rows)], failures, skipped
