"""Reading the table a stage receives from the stage before it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd


def read_stage_input(
    path: Path, required: Iterable[str], error: type[Exception], previous_stage: str
) -> pd.DataFrame:
    """Read a stage's input table, checking that it exists and has the columns the stage needs.

    Args:
        path: the Parquet table written by the previous stage.
        required: columns the reading stage needs.
        error: the reading stage's user-error class, raised with a message naming the file.
        previous_stage: the stage that writes ``path``, named in the message.

    Raises:
        error: when the file is missing or lacks a required column.
    """
    if not path.exists():
        raise error(f"{path} not found: run the {previous_stage} stage first")
    records = pd.read_parquet(path)
    missing = [column for column in required if column not in records.columns]
    if missing:
        raise error(f"{path} lacks the column(s) {', '.join(missing)}")
    return records
