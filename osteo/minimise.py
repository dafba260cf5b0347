"""Minimisation: a store only ever receives the fields declared for it.

Implements ENISA control 4.22, "minimise data at each step of the processing; collect only what
is needed when needed". The fields each store may hold, and why each is needed, are declared in
one place, ``infra/fields.yaml``. Before a table goes to a store, ``check_fields`` compares its
columns with that declaration and refuses any other field with ``UndeclaredFieldError``, naming
the store, the fields and the file; ``write_table`` checks and then writes Parquet, locally
(an output DVC pushes to the store) or directly to the store's bucket.

Reads ``infra/fields.yaml``; writes only the tables it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

from osteo.config import PACKAGE_ROOT, ConfigError, bucket

logger = logging.getLogger(__name__)

FIELDS_FILE = PACKAGE_ROOT / "infra" / "fields.yaml"


class UndeclaredFieldError(Exception):
    """A table holds fields its store may not hold; the message names store, fields and file.

    Attributes:
        store: the store the table was meant for.
        fields: the undeclared field names, sorted.
        source: the file or object key of the table.
    """

    def __init__(self, store: str, fields: list[str], source: str) -> None:
        self.store, self.fields, self.source = store, fields, source
        super().__init__(
            f"{source}: the {store} store may not hold the field(s) {', '.join(fields)}; "
            f"drop them, or declare them with the reason they are needed in "
            f"infra/fields.yaml (control 4.22, minimisation)"
        )


@lru_cache(maxsize=4)
def load_fields(path: Path = FIELDS_FILE) -> dict[str, frozenset[str]]:
    """Read the declared fields of every store.

    Args:
        path: the declaration, by default ``infra/fields.yaml``.

    Returns:
        Store name to the set of field names it may hold.

    Raises:
        ConfigError: when a group lacks its fields or its reason.
    """
    with Path(path).open() as handle:
        document = yaml.safe_load(handle)
    declared: dict[str, frozenset[str]] = {}
    for store, groups in document.items():
        for position, group in enumerate(groups, start=1):
            if not group.get("fields") or not str(group.get("why", "")).strip():
                raise ConfigError(f"{path}: {store}, group {position} needs 'fields' and 'why'")
        declared[store] = frozenset(str(f) for group in groups for f in group["fields"])
    return declared


def declared_fields(store: str) -> frozenset[str]:
    """The fields ``store`` may hold.

    Raises:
        ConfigError: when the store has no declaration.
    """
    fields = load_fields()
    if store not in fields:
        raise ConfigError(f"no fields declared for store '{store}' in {FIELDS_FILE}")
    return fields[store]


def check_fields(store: str, columns: Iterable[object], source: str | Path) -> None:
    """Refuse a table whose columns are not all declared for ``store``.

    Args:
        store: the destination store, e.g. ``training``.
        columns: the table's column names.
        source: the file or object key of the table, named in the error.

    Raises:
        UndeclaredFieldError: when a column is not declared for the store.
        ConfigError: when the store has no declaration.
    """
    undeclared = sorted({str(column) for column in columns} - declared_fields(store))
    if undeclared:
        raise UndeclaredFieldError(store, undeclared, str(source))


def check_file(store: str, path: str | Path) -> None:
    """Check the columns of a Parquet or CSV file (e.g. every output before a DVC push).

    Args:
        store: the destination store.
        path: a ``.parquet`` or ``.csv`` file.

    Raises:
        UndeclaredFieldError: when a column is not declared for the store.
        ValueError: when the file is neither Parquet nor CSV.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        schema = pq.read_schema(path)
        index = (schema.pandas_metadata or {}).get("index_columns", [])
        columns: list[str] = [name for name in schema.names if name not in index]
    elif path.suffix == ".csv":
        columns = list(pd.read_csv(path, nrows=0).columns)
    else:
        raise ValueError(f"{path}: only .parquet and .csv tables can be checked")
    check_fields(store, columns, path)


def write_table(
    store: str, frame: pd.DataFrame, path_or_key: str | Path, role: str | None = None
) -> str:
    """Check a table's columns against its store, then write it as Parquet (index left out).

    Args:
        store: the destination store.
        frame: the table.
        path_or_key: a local path (an output DVC pushes to the store) or, with ``role``, an
            object key in the store's bucket.
        role: the role writing to the bucket; None writes the local path.

    Returns:
        Where the table was written: the local path or ``s3://bucket/key``.

    Raises:
        UndeclaredFieldError: when a column is not declared for the store; nothing is written.
        ConfigError: when the store has no declaration, or the storage is not configured.
    """
    # 1. Check first: a refused table never reaches the disk or the store.
    target = f"s3://{bucket(store)}/{path_or_key}" if role else str(path_or_key)
    check_fields(store, frame.columns, target)

    # 2. Write locally, or to the bucket acting as the role.
    if role is None:
        Path(path_or_key).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path_or_key, index=False)
    else:
        from osteo.storage import s3_filesystem

        with s3_filesystem(role).open(target, "wb") as handle:
            frame.to_parquet(handle, index=False)
    logger.info("wrote %d rows to %s (%s store, fields checked)", len(frame), target, store)
    return target
