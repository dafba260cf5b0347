"""Quarantine: every record a stage rejects is kept here with its reason, never dropped silently.

A quarantine row names where the record came from (the export file and, for CSV files, the row
number as a spreadsheet shows it: the header is row 1) and why it was rejected. It never holds a
patient name, reference or birth date: after pseudonymisation a record is named by its
pseudonymous image id, before it only by export file and row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

COLUMNS = ["stage", "source", "row", "record_id", "reason", "detail"]


@dataclass(frozen=True)
class Rejection:
    """One rejected record.

    Attributes:
        stage: the stage that rejected it, e.g. ``ingest``.
        source: export file it came from, e.g. ``images/IMG00017.dcm`` or ``annotations.csv``.
        row: row number in a CSV source (header is row 1), or None for files.
        record_id: pseudonymous image id once known, else empty.
        reason: a short, stable reason code, e.g. ``unreadable_dicom``.
        detail: a sentence a data engineer can act on; never identifying values.
    """

    stage: str
    source: str
    reason: str
    detail: str = ""
    row: int | None = None
    record_id: str = ""


@dataclass
class Quarantine:
    """Collects the rejections of one stage and writes them as ``data/quarantine/<stage>.csv``."""

    stage: str
    rejections: list[Rejection] = field(default_factory=list)

    def add(
        self, source: str, reason: str, detail: str = "", row: int | None = None,
        record_id: str = "",
    ) -> None:
        """Record one rejected record."""
        self.rejections.append(Rejection(self.stage, source, reason, detail, row, record_id))

    def __len__(self) -> int:
        return len(self.rejections)

    def by_reason(self) -> dict[str, int]:
        """Count the rejections per reason code."""
        return dict(Counter(rejection.reason for rejection in self.rejections))

    def frame(self) -> pd.DataFrame:
        """The rejections as a table with the columns of ``COLUMNS``."""
        frame = pd.DataFrame([asdict(r) for r in self.rejections], columns=COLUMNS)
        return frame.astype({"row": "Int64"})

    def write(self, path: Path) -> None:
        """Write the quarantine table (an empty table with headers when nothing was rejected)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame().to_csv(path, index=False)
