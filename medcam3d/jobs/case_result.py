"""What one case produced (:class:`CaseResult`, its ``summary.json`` record) and a case explained but
not yet written (:class:`ExplainedCase`, handed from the explaining process to the writing one)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._json import json_values
from .case_loading import LoadedCase
from .outputs import MARKER

__all__ = ["CaseResult", "ExplainedCase"]


@dataclass
class CaseResult:
    """What one case produced; ``rows()`` flattens it for the summary table."""

    case_id: str
    image: str  # the scan, or the first channel of several
    status: str = "ok"
    error: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # one per (method, class)
    files: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)  # the settings that produced it (see Runner.run_settings)
    segmentation: dict | None = None  # output.segment: the lesions found (see medcam3d.segment)
    # per method: how its feature grid was placed on the input ("receptive_field" or "align_corners"),
    # the layer, and the receptive field's step/offset/size in input voxels (None for align_corners)
    placement: dict = field(default_factory=dict)
    # per method: what the method reports about its own run (Explanation.diagnostics as JSON values):
    # Integrated Gradients' completeness error per class, the forward passes occlusion and Score-CAM
    # spent, the stages a fused map combined
    diagnostics: dict = field(default_factory=dict)
    # a case of several channels (MR sequences): every channel's path, in the model's channel order
    # (empty for one scan); the maps lie on the first channel's grid
    channels: list[str] = field(default_factory=list)

    @classmethod
    def from_summary(cls, data: dict) -> CaseResult | None:
        """The result recorded in a case's ``summary.json``; ``None`` when it is not a valid record."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            result = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None
        if not isinstance(result.case_id, str) or not isinstance(result.findings, list):
            return None
        return result

    def to_summary(self) -> dict:
        """The ``summary.json`` record, with the medcam3d marker; strict JSON (no NaN)."""
        from .. import __version__

        record = {MARKER: {"kind": "case", "version": __version__}, **dataclasses.asdict(self)}
        return json_values(record)

    @staticmethod
    def recorded_run(settings: dict) -> dict:
        """``settings`` as ``summary.json`` records them in ``run`` (strict JSON, other objects as text):
        what ``batch --resume`` compares with a case's recorded ``run``."""
        return json.loads(json.dumps(json_values(settings)))

    def row(self) -> dict:
        """One summary row: probabilities and, per method and class, the peak and its check."""
        row: dict = {"case": self.case_id, "image": self.image, "status": self.status, "error": self.error}
        for name, value in self.probabilities.items():
            row[f"p_{name}"] = round(value, 4)
        for finding in self.findings:
            key = f"{finding['method']}_{finding['class']}"
            peak_mm = finding["peak_mm"]  # None: a flat map has no peak (an empty cell)
            row[f"{key}_peak_mm"] = "" if peak_mm is None else " ".join(f"{v:.1f}" for v in peak_mm)
            if finding.get("peak_in_lesion") is not None:
                row[f"{key}_peak_in_lesion"] = finding["peak_in_lesion"]
        return row



@dataclass
class ExplainedCase:
    """A case explained but not yet written (see :meth:`Runner.explain_case`, :meth:`Runner.write_case`).

    Picklable (tensors on the CPU), so that another process can write it.
    """

    result: CaseResult
    image: str | Path | Sequence[str | Path]  # a scan, or a list of channel scans
    out_dir: Path
    loaded: LoadedCase
    explanations: list  # one Explanation per method, on the CPU
