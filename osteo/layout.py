"""Where each stage reads and writes, relative to the project directory.

Two areas, kept apart on purpose:

``work/``  local only, never cached or pushed by DVC: the ingested export still carries patient
           names and references until the pseudonymise stage replaces them.
``data/``  pseudonymised outputs, tracked by DVC and pushed to the training store.
``reports/`` validation report and per-stage summaries, tracked by DVC too.

Formats:

* tables are Parquet; the quarantine of each stage is ``data/quarantine/<stage>.csv`` with the
  columns of ``osteo.quarantine.COLUMNS``;
* pixels are stored in shards (``osteo.shards``): uncompressed ``.npz`` archives holding up to
  ``shard_size`` images, so DVC handles a few large objects instead of thousands of small ones.
  The model inputs ingest made are members named by a neutral rank (each record names its
  ``shard`` and ``member``), so their shards pass from ``work/`` to ``data/`` as they are; the
  prepared shards keep those names and hold the accepted images only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of every stage's inputs and outputs under one project directory."""

    root: Path

    # ingest (identifiable, local only)
    @property
    def ingest_dir(self) -> Path:
        return self.root / "work" / "ingest"

    @property
    def ingested_records(self) -> Path:
        return self.ingest_dir / "records.parquet"

    @property
    def manifest(self) -> Path:
        return self.ingest_dir / "manifest.csv"

    @property
    def ingest_pixel_dir(self) -> Path:
        return self.ingest_dir / "pixels"

    # pseudonymise
    @property
    def pseudonymised_dir(self) -> Path:
        return self.root / "data" / "pseudonymised"

    @property
    def pseudonymised_records(self) -> Path:
        return self.pseudonymised_dir / "records.parquet"

    @property
    def pseudonymised_pixel_dir(self) -> Path:
        return self.pseudonymised_dir / "pixels"

    # validate
    @property
    def validated_dir(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def validated_records(self) -> Path:
        return self.validated_dir / "records.parquet"

    @property
    def validation_report(self) -> Path:
        return self.reports_dir / "validation.html"

    # preprocess
    @property
    def prepared_dir(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def prepared_records(self) -> Path:
        return self.prepared_dir / "records.parquet"

    @property
    def prepared_pixel_dir(self) -> Path:
        return self.prepared_dir / "pixels"

    # split
    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    @property
    def split_table(self) -> Path:
        return self.split_dir / "split.parquet"

    # shared
    @property
    def quarantine_dir(self) -> Path:
        return self.root / "data" / "quarantine"

    def quarantine(self, stage: str) -> Path:
        return self.quarantine_dir / f"{stage}.csv"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def summary(self, stage: str) -> Path:
        return self.reports_dir / f"{stage}.json"
