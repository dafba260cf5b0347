"""Stage summaries: the machine-readable account of what each stage received and did.

Every stage writes ``reports/<stage>.json`` with its counts; the invariant
``records_in == accepted + quarantined`` is checked before the file is written, so a stage that
loses a record fails loudly instead of dropping it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class AccountingError(RuntimeError):
    """A stage's counts do not add up: a record was lost or counted twice."""


@dataclass
class StageSummary:
    """Counts of one stage run.

    Attributes:
        stage: stage name.
        records_in: records the stage received (its unit is named in ``unit``).
        accepted: records passed on to the next stage.
        quarantined: records rejected, by reason code.
        unit: what a record is for this stage, e.g. ``image``.
        outputs: where the outputs went, by name.
        extra: stage-specific figures (disagreements, ratios, timings).
    """

    stage: str
    records_in: int
    accepted: int
    quarantined: dict[str, int] = field(default_factory=dict)
    unit: str = "image"
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def check(self) -> None:
        """Raise when ``records_in != accepted + quarantined``.

        Raises:
            AccountingError: the counts do not add up.
        """
        if self.records_in != self.accepted + self.quarantined_total:
            raise AccountingError(
                f"{self.stage}: {self.records_in} {self.unit}s in but {self.accepted} accepted "
                f"+ {self.quarantined_total} quarantined"
            )

    def write(self, path: Path) -> None:
        """Check the invariant, then write the summary as JSON."""
        self.check()
        path.parent.mkdir(parents=True, exist_ok=True)
        document = asdict(self) | {"quarantined_total": self.quarantined_total}
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> StageSummary:
        document = json.loads(path.read_text())
        document.pop("quarantined_total", None)
        return cls(**document)
