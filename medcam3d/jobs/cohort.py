"""Cohorts: many scans, resumable, across processes and machines (``torchrun``).

Each process (rank) takes every ``world_size``-th case, reads and preprocesses in DataLoader
workers so that I/O overlaps compute, and writes each case folder atomically (see
:class:`~medcam3d.pipeline.Runner`); a case whose folder exists is skipped with ``resume``.
Rank 0 merges the rows of all ranks into one ``summary.csv`` in input order. Launch::

    torchrun --nproc_per_node 2 -m medcam3d batch --config C --inputs DIR --out OUT [--resume]

gloo is used on CPU, NCCL on GPU (one GPU per local rank).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import Case
from .outputs import check_output_location
from .report import write_csv
from .runner import Runner, load_case

__all__ = ["Case", "DistributedContext", "distributed_context", "run_cohort", "write_csv"]  # Case, write_csv: re-exported


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

    def __init__(self, cases: Sequence[Case], transforms, trust: bool = False, reader=None, model=None) -> None:
        self.cases = list(cases)
        self.transforms = transforms
        self.trust = trust
        self.reader = reader
        self.model = model

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        try:
            loaded = load_case(case.image, self.transforms, case.mask, trust=self.trust, volume=case.volume,
                               series=case.series, reader=self.reader, model=self.model)
            return {"case": case, "loaded": _as_tensors(loaded), "error": ""}
        except Exception as error:  # reported by the main process, the cohort goes on
            return {"case": case, "loaded": None, "error": f"{type(error).__name__}: {error}"}


def _as_tensors(loaded):
    """The case's arrays as tensors: a DataLoader hands tensors over in shared memory, while numpy
    arrays are pickled through a pipe (about 2 s of the main process for a 512x512x300 float32 CT)."""
    import dataclasses

    def shared(array):
        try:
            return torch.from_numpy(array) if array is not None else None
        except (TypeError, ValueError):  # a dtype torch lacks, or a read-only array: sent as is
            return array

    return dataclasses.replace(loaded, scan=shared(loaded.scan), labels=shared(loaded.labels))


def _as_arrays(loaded):
    """Undo :func:`_as_tensors` (no copy: the arrays view the shared memory)."""
    import dataclasses

    if loaded is None:
        return None
    plain = {name: value.numpy() for name in ("scan", "labels")
             if isinstance(value := getattr(loaded, name), torch.Tensor)}
    return dataclasses.replace(loaded, **plain) if plain else loaded


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
    """This run's rows after the rows of an earlier run's ``summary.csv`` for other cases (kept in order)."""
    if not path.is_file():
        return rows
    ours = {row.get("case") for row in rows}
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            earlier = [row for row in csv.DictReader(stream) if row.get("case") not in ours]
    except (OSError, UnicodeDecodeError, csv.Error):
        return rows
    return earlier + rows


def run_cohort(
    runner: Runner,
    cases: Sequence[Case],
    out: Path,
    *,
    resume: bool = False,
    workers: int = 1,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> tuple[list[dict], int, int]:
    """Explain this rank's share of ``cases`` into ``out``; merge the summary on rank 0.

    Returns
    -------
    (rows, failures, skipped)
        On rank 0 the rows of all ranks in input order (other ranks: their own), the number of
        failed cases and of cases skipped by ``resume`` (over all ranks).
    """
    from monai.data import DataLoader
    from tqdm import tqdm

    context = context or DistributedContext()
    out = check_output_location(out, [p for case in cases for p in (case.image, case.mask)])
    out.mkdir(parents=True, exist_ok=True)
    mine = [(index, case) for index, case in enumerate(cases) if index % context.world_size == context.rank]
    rows: dict[int, dict] = {}
    skipped = 0
    todo = []
    for index, case in mine:
        done = runner.is_done(out, case.id) if resume else None
        if done is not None:
            rows[index] = done.row()
            skipped += 1
        else:
            todo.append((index, case))
    loader = DataLoader(_CaseDataset([case for _, case in todo], runner.transforms, runner.trust, runner.reader,
                                     runner.model), batch_size=1,
                        num_workers=workers, collate_fn=_first)
    failures = 0
    bar = tqdm(total=len(todo), desc=f"explaining (rank {context.rank})" if context.distributed else "explaining",
               unit="case", file=sys.stderr, disable=not progress or context.rank != 0)
    with _threads_beside_workers(workers):
        for (index, case), item in zip(todo, loader):
            try:
                if item["error"]:
                    raise RuntimeError(item["error"])
                rows[index] = runner.run_case(case.image, out, case_id=case.id, mask=case.mask,
                                              loaded=_as_arrays(item["loaded"])).row()
            except Exception as error:  # recorded; the cohort goes on
                failures += 1
                message = str(error) if isinstance(error, RuntimeError) and item["error"] else f"{type(error).__name__}: {error}"
                rows[index] = {"case": case.id, "image": str(case.image), "status": "error", "error": message}
            bar.update()
            if not context.distributed:
                write_csv(out / "summary.csv", _merge_summary(out / "summary.csv", [rows[i] for i in sorted(rows)]))
    bar.close()
    if context.distributed:
        gathered: list = [None] * context.world_size
        torch.distributed.all_gather_object(gathered, (rows, failures, skipped))
        rows = {index: row for part, _, _ in gathered for index, row in part.items()}
        failures = sum(part[1] for part in gathered)
        skipped = sum(part[2] for part in gathered)
        if context.rank == 0:
            write_csv(out / "summary.csv", _merge_summary(out / "summary.csv", [rows[i] for i in sorted(rows)]))
        torch.distributed.barrier()
    else:
        write_csv(out / "summary.csv", _merge_summary(out / "summary.csv", [rows[i] for i in sorted(rows)]))
    return [rows[i] for i in sorted(rows)], failures, skipped
