"""What the commands print: tables of findings and a finding's peak."""

from __future__ import annotations


def print_table(rows: list[dict], columns: list[str] | None = None, stream=None) -> None:
    from ..jobs.report import print_table

    print_table(rows, columns, stream)


def peak_text(peak_mm) -> str:
    """A finding's peak for the tables; a flat (all-zero) map has none."""
    return "none (flat map)" if peak_mm is None else "({:.1f}, {:.1f}, {:.1f})".format(*peak_mm)
