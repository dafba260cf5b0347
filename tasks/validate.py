"""Validate: control every record and every image before the model may learn from it.

ENISA control 4.9, *control all data used by the ML model*: the pseudonymised dataset is checked
twice before preprocessing. First against Great Expectations suites kept as data in
``expectations/`` (``records.json`` for the tabular fields, ``images.json`` for per-image
statistics); then by the report's "more traditional data science check to eliminate data that
deviates too much from the normal": robust z-scores (median and MAD) over image and patient
features. A record that fails is quarantined with the reason of the first expectation it fails
(or ``outlier``) and every failure in its detail; the others go on. An unexpected value never
stops the run; only a table that does not have the pseudonymised columns does.

Reads:
    ``data/pseudonymised/records.parquet`` (with the image statistics ingest measured when it
    decoded each radiograph, ``osteo.radiograph``), the member lists of
    ``data/pseudonymised/pixels/shard-*`` (not the pixels themselves),
    ``expectations/records.json`` and ``expectations/images.json`` (or the directory named by
    params ``validate.suites``).
Writes:
    ``data/validated/records.parquet`` (accepted records and their image statistics),
    ``data/quarantine/validate.csv``, ``reports/validate.json`` (stage summary) and
    ``reports/validation.html`` (the report a data engineer reads).

The statistics are measured where the pixels are decoded, once per image at ingest, and judged
here; a record without statistics, or whose member is absent from its shard, is quarantined
(``image_unusable``, ``image_missing``).

Great Expectations is imported only when the stage runs: the import alone takes about 2 s, the
fixed cost of this stage (``timings.gx_setup_seconds`` in ``reports/validate.json``).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from osteo.config import PACKAGE_ROOT, ConfigError
from osteo.layout import Layout
from osteo.quarantine import Quarantine
from osteo.radiograph import STAT_COLUMNS
from osteo.shards import stored_places
from osteo.summary import StageSummary

logger = logging.getLogger(__name__)

STAGE = "validate"
SUITES_DIR = PACKAGE_ROOT / "expectations"

MAD_SCALE = 1.4826              # MAD x 1.4826 estimates the standard deviation of a normal law
MIN_OUTLIER_SAMPLE = 10         # fewer accepted records than this: no outlier rejection
OUTLIER_FEATURES = ("mean_norm", "std_norm", "p01_norm", "p99_norm", "aspect", "age", "bmi")
REPORTED_OUTLIERS = 200         # rows of the outlier table in the HTML report



class ValidateError(Exception):
    """The validate stage cannot run: missing input, unusable suite or table; names the file."""


# ---------------------------------------------------------------- per-image statistics


def recorded_statistics(
    records: pd.DataFrame, pixel_dir: Path,
) -> tuple[pd.DataFrame, dict[str, str], int]:
    """The statistics of each recorded image, and whether its pixels are in the shards.

    Only the shards' member lists are read, not their pixels: the statistics were measured
    when ingest decoded the images.

    Args:
        records: the pseudonymised records (image_id, shard, member and ``STAT_COLUMNS``).
        pixel_dir: the directory of the pseudonymised pixel shards.

    Returns:
        The statistics indexed by image id (columns ``STAT_COLUMNS``) of the images whose
        pixels are stored; the images with pixels but no usable statistics, with the reason
        why (image id -> sentence); and the number of stored images no record names.
    """
    stored = stored_places(pixel_dir)
    located = list(zip(records["shard"].astype(str), records["member"].astype(str), strict=True))
    named = records["image_id"].map(lambda value: isinstance(value, str))
    present = pd.Series([place in stored for place in located], index=records.index) & named
    stats = (records[present].drop_duplicates("image_id").set_index("image_id")
             .reindex(columns=list(STAT_COLUMNS)))
    incomplete = stats.isna().any(axis=1)
    unusable = {
        str(image_id): "no image statistics were measured for these pixels"
        for image_id in stats.index[incomplete]
    }
    orphans = len(stored - set(located))
    return stats[~incomplete], unusable, orphans


# ---------------------------------------------------------------- expectation suites


@dataclass
class Check:
    """The outcome of one expectation over the whole table.

    Attributes:
        suite: suite name (``records`` or ``images``).
        expectation: Great Expectations type, e.g. ``expect_column_values_to_be_between``.
        columns: the columns it checks.
        reason: quarantine reason code of a record failing it (from ``meta.reason``).
        parameters: its arguments once suite parameters are resolved, columns left out.
        success: whether every record met it.
        unexpected: number of records failing it.
        notes: why the expectation exists (from the suite file).
    """

    suite: str
    expectation: str
    columns: list[str]
    reason: str
    parameters: dict[str, Any]
    success: bool
    unexpected: int
    notes: str = ""


@dataclass
class SuiteOutcome:
    """Results of one suite: one ``Check`` per expectation, and failures per record."""

    checks: list[Check] = field(default_factory=list)
    failures: dict[Hashable, list[tuple[str, str]]] = field(default_factory=dict)


def _configure_gx_environment() -> None:
    """No usage statistics, no INFO chatter; must run before great_expectations is imported.

    The GX logger is raised to WARNING only when nobody configured it (``osteo.logs`` does the
    same for the command line), so an explicit logging setup still wins.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def load_suite(path: Path) -> Any:
    """Load an expectation suite kept as JSON data.

    Every expectation must carry ``meta.reason``, the quarantine reason of failing records.

    Args:
        path: a suite file in Great Expectations' JSON form (name, expectations, meta, notes).

    Returns:
        A ``great_expectations.core.ExpectationSuite``.

    Raises:
        ValidateError: the file is missing, is not JSON, or an expectation is unusable.
    """
    _configure_gx_environment()
    from great_expectations.core import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    # 1. Read the document.
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValidateError(f"expectation suite {path} is unreadable: {error}") from None

    # 2. Build each expectation, naming the bad one when GX refuses it.
    expectations = []
    for number, item in enumerate(document.get("expectations", []), start=1):
        reason = (item.get("meta") or {}).get("reason")
        if not isinstance(reason, str) or not reason:
            raise ValidateError(f"{path}: expectation {number} has no meta.reason")
        try:
            expectations.append(ExpectationConfiguration(**item).to_domain_obj())
        except Exception as error:  # GX raises many exception types for one bad entry
            raise ValidateError(f"{path}: expectation {number} is unusable: {error}") from None
    return ExpectationSuite(
        name=document.get("name") or path.stem, expectations=expectations,
        meta=document.get("meta") or {}, notes=document.get("notes"),
    )


def suite_parameters(suite: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Resolve the suite's ``$PARAMETER`` values from params.yaml.

    A suite lists, in ``meta.parameters_from_params_yaml``, each parameter name and its path in
    params.yaml, e.g. ``"age_min": ["validate", "age", 0]``.

    Args:
        suite: a loaded suite.
        params: the content of params.yaml.

    Returns:
        Parameter name -> value, as Great Expectations' ``expectation_parameters`` wants it.

    Raises:
        ConfigError: a path does not lead to a value in params.yaml.
    """
    resolved: dict[str, Any] = {}
    for name, path in (suite.meta.get("parameters_from_params_yaml") or {}).items():
        value: Any = params
        try:
            for key in path:
                value = value[key]
        except (KeyError, IndexError, TypeError):
            dotted = ".".join(str(key) for key in path)
            raise ConfigError(
                f"params.yaml: {dotted} is missing (needed by expectation suite "
                f"'{suite.name}' as {name})"
            ) from None
        resolved[name] = value
    return resolved


class ExpectationRunner:
    """A quiet, in-memory Great Expectations context with one pandas data source.

    Creating it imports Great Expectations (about 2 s the first time in a process) and builds
    an ephemeral context (milliseconds); ``setup_seconds`` records the cost.
    """

    def __init__(self) -> None:
        started = time.perf_counter()
        _configure_gx_environment()
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        # In-memory stores and no data docs site: nothing is written to disk, no temp folder.
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        self.source = self.context.data_sources.add_pandas("osteo")
        self.setup_seconds = time.perf_counter() - started

    def run(
        self, suite: Any, frame: pd.DataFrame, parameters: dict[str, Any], source: str,
    ) -> SuiteOutcome:
        """Validate a table against a suite and collect the failing records.

        Args:
            suite: a loaded suite whose expectations carry ``meta.reason``.
            frame: the table; its index labels name the records in ``failures``.
            parameters: ``$PARAMETER`` values.
            source: the table and suite file, for error messages.

        Returns:
            One ``Check`` per expectation in suite order, and the failures of each record as
            ``(reason, detail)`` pairs in suite order.

        Raises:
            ValidateError: an expectation could not be evaluated (e.g. a column named in the
                suite is absent), or one that names no record (table-level or aggregate, e.g.
                the column set) failed.
        """

        # 1. Whole-dataframe batch, suite registered so results map back to its order.
        asset = self.source.add_dataframe_asset(name=suite.name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame}
        )
        suite = self.context.suites.add(suite)
        order = {expectation.id: number for number, expectation in enumerate(suite.expectations)}
        result = batch.validate(
            suite, result_format={"result_format": "COMPLETE"},
            expectation_parameters=parameters,
        )

        # 2. Per-expectation checks; per-record failures from the unexpected indices.
        outcome = SuiteOutcome()
        by_order = sorted(result.results, key=lambda r: order[r.expectation_config.id])
        for item in by_order:
            check, labels = _read_result(suite.name, item, source)
            outcome.checks.append(check)
            for label in labels:
                detail = _failure_detail(check, frame, label)
                outcome.failures.setdefault(label, []).append((check.reason, detail))
        return outcome


def _raised(exception_info: Any) -> str:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    infos = [exception_info] if "raised_exception" in (exception_info or {}) else \
        list((exception_info or {}).values())
    messages = [str(info.get("exception_message")) for info in infos
                if isinstance(info, dict) and info.get("raised_exception")]
    return "; ".join(sorted(set(messages)))


def _read_result(suite_name: str, item: Any, source: str) -> tuple[Check, list[Hashable]]:
    """Turn one GX expectation result into a ``Check`` and the failing index labels."""
    config = item.expectation_config
    message = _raised(item.exception_info)
    if message:
        raise ValidateError(f"{source}: {config.type} could not be evaluated: {message}")
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    columns = [kwargs.pop(k) for k in ("column", "column_A", "column_B") if k in kwargs]
    labels = list(item.result.get("unexpected_index_list") or [])
    check = Check(
        suite=suite_name, expectation=config.type, columns=columns,
        reason=config.meta["reason"], parameters=kwargs, success=bool(item.success),
        unexpected=int(item.result.get("unexpected_count") or len(labels)),
        notes=config.notes or "",
    )
    if not check.success and not labels:
        # A table-level or aggregate expectation names no record to quarantine.
        raise ValidateError(
            f"{source}: {config.type} failed for the whole table ({check.reason}): "
            f"{_whole_table_failure(item.result.get('observed_value'), kwargs)}"
        )
    return check, labels


def _whole_table_failure(observed: Any, parameters: dict[str, Any]) -> str:
    """Say what differs when a table-level expectation fails; column names only."""
    if "column_set" in parameters and isinstance(observed, list):
        missing = [c for c in parameters["column_set"] if c not in observed]
        extra = [c for c in observed if c not in parameters["column_set"]]
        return f"missing columns {missing or 'none'}, unexpected columns {extra or 'none'}"
    return f"observed {observed}, expected {_format_parameters(parameters)}"


def _show(value: Any) -> str:
    """A value for a quarantine detail. Text is never echoed: it could hold an identity."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | float | np.integer | np.floating):
        return f"{float(value):.6g}"
    return "(text withheld)"


def _format_parameters(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in parameters.items())


def _failure_detail(check: Check, frame: pd.DataFrame, label: Hashable) -> str:
    values = ", ".join(f"{column}={_show(frame.at[label, column])}" for column in check.columns)
    return f"{check.expectation}({_format_parameters(check.parameters)}): {values}"


# ---------------------------------------------------------------- robust outlier rejection


@dataclass
class FeatureSpread:
    """Median and MAD of one feature over the records that passed the suites.

    Attributes:
        feature: column name.
        count: records with a finite value.
        median: median value.
        mad: median absolute deviation (unscaled).
        used: whether the feature could reject records (MAD > 0 and enough records).
        rejected: records whose robust z-score is beyond the threshold on this feature.
    """

    feature: str
    count: int
    median: float
    mad: float
    used: bool
    rejected: int = 0


def robust_z_scores(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z-scores ``(x - median) / (1.4826 * MAD)``, NaN where undefined.

    Args:
        values: one feature over all records; NaN values are left out of median and MAD.

    Returns:
        The z-scores (all NaN when the MAD is 0: the feature does not vary for most records and
        any difference would look infinitely far), the median and the unscaled MAD.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full(values.shape, np.nan), math.nan, math.nan
    median = float(np.median(finite))
    mad = float(np.median(np.abs(finite - median)))
    if mad == 0:
        return np.full(values.shape, np.nan), median, mad
    return (values - median) / (MAD_SCALE * mad), median, mad


def find_outliers(
    frame: pd.DataFrame, features: Iterable[str], threshold: float,
) -> tuple[dict[Hashable, list[tuple[str, float]]], list[FeatureSpread]]:
    """Find records beyond ``threshold`` robust standard deviations on any feature.

    Features whose MAD is 0 are not used: most records share one value, so the robust scale
    is undefined. With fewer than ``MIN_OUTLIER_SAMPLE`` records no feature is used.

    Args:
        frame: the records that passed the suites, with the feature columns.
        features: feature column names.
        threshold: the largest accepted absolute robust z-score.

    Returns:
        Per record label, the ``(feature, z)`` pairs beyond the threshold; and each feature's
        spread.
    """
    # Limitation: each feature is scored on its own, against this dataset only. A record unusual
    # only in a combination of features passes, and a poisoning that makes up half of the
    # dataset moves the median itself; no reference distribution from earlier versions is used.
    outliers: dict[Hashable, list[tuple[str, float]]] = {}
    spreads: list[FeatureSpread] = []
    for feature in features:
        values = pd.to_numeric(frame[feature], errors="coerce").to_numpy(dtype=np.float64)
        z, median, mad = robust_z_scores(values)
        count = int(np.isfinite(values).sum())
        used = count >= MIN_OUTLIER_SAMPLE and bool(np.isfinite(z).any())
        spread = FeatureSpread(feature, count, median, mad, used)
        if used:
            beyond = np.flatnonzero(np.abs(np.nan_to_num(z)) > threshold)
            spread.rejected = len(beyond)
            for position in beyond:
                outliers.setdefault(frame.index[position], []).append((feature, float(z[position])))
        spreads.append(spread)
    return outliers, spreads


# ---------------------------------------------------------------- HTML report


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:72em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;
font-variant-numeric:tabular-nums}.ok{color:#176f2c;font-weight:600}
.fail{color:#b00020;font-weight:600}.note{color:#555;font-size:.9em}
"""


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f"<td class=\"n\">{cell}</td>" if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{float(value):.4g}"


@dataclass
class ValidationReport:
    """Everything the HTML report shows."""

    summary: StageSummary
    checks: list[Check]
    spreads: list[FeatureSpread]
    outliers: list[tuple[str, str, float, float]]   # image_id, feature, value, z
    distributions: pd.DataFrame
    settings: dict[str, Any]
    suites: dict[str, str]


def _section_counts(report: ValidationReport) -> str:
    summary = report.summary
    reasons = [[html.escape(reason), count]
               for reason, count in sorted(summary.quarantined.items())]
    return (
        "<h2>Records</h2>"
        + _table(["images in", "accepted", "quarantined"],
                 [[summary.records_in, summary.accepted, summary.quarantined_total]], {0, 1, 2})
        + "<h3>Quarantined by reason</h3>"
        + (_table(["reason", "images"], reasons, {1}) if reasons else "<p>None.</p>")
        + "<p class=\"note\">A record failing several checks is counted once, under the first "
        "failure; its quarantine detail lists all of them.</p>"
    )


def _section_checks(report: ValidationReport) -> str:
    rows = [
        [html.escape(c.suite), html.escape(c.expectation), html.escape(", ".join(c.columns)),
         html.escape(_format_parameters(c.parameters)), html.escape(c.reason),
         "<span class=\"ok\">passed</span>" if c.success else "<span class=\"fail\">failed</span>",
         c.unexpected, f"<span class=\"note\">{html.escape(c.notes)}</span>"]
        for c in report.checks
    ]
    suites = "".join(f"<li>{html.escape(name)}: sha256 {html.escape(digest)}</li>"
                     for name, digest in report.suites.items())
    return (
        "<h2>Expectations</h2><ul>" + suites + "</ul>"
        + _table(["suite", "expectation", "columns", "parameters", "reason", "result",
                  "failing records", "why"], rows, {6})
    )


def _section_outliers(report: ValidationReport) -> str:
    threshold = report.settings["outlier_z"]
    spreads = [
        [html.escape(s.feature), s.count, _number(s.median), _number(s.mad),
         s.rejected if s.used else "not used (MAD is 0 or too few records)"]
        for s in report.spreads
    ]
    shown = report.outliers[:REPORTED_OUTLIERS]
    rows = [[html.escape(i), html.escape(f), _number(v), _number(z)] for i, f, v, z in shown]
    more = len(report.outliers) - len(shown)
    return (
        f"<h2>Outliers (robust |z| &gt; {html.escape(str(threshold))})</h2>"
        "<p class=\"note\">z = (value - median) / (1.4826 &times; MAD), over the records that "
        "passed both suites.</p>"
        + _table(["feature", "records", "median", "MAD", "rejected"], spreads, {1, 2, 3})
        + (_table(["image id", "feature", "value", "z"], rows, {2, 3}) if rows else "")
        + (f"<p class=\"note\">{more} more in data/quarantine/validate.csv.</p>" if more else "")
    )


def _section_distributions(report: ValidationReport) -> str:
    frame = report.distributions
    rows = [[html.escape(str(name))] + [_number(v) for v in row]
            for name, row in zip(frame.index, frame.to_numpy(), strict=True)]
    return (
        "<h2>Feature distributions of accepted images</h2>"
        + _table(["feature", *[str(c) for c in frame.columns]], rows,
                 set(range(1, len(frame.columns) + 1)))
    )


def write_html_report(path: Path, report: ValidationReport) -> None:
    """Write the validation report as one self-contained HTML file (inline CSS, no scripts).

    Args:
        path: where to write it, e.g. ``reports/validation.html``.
        report: what to show.
    """
    settings = _table(["setting", "value"],
                      [[html.escape(k), html.escape(str(v))] for k, v in report.settings.items()])
    body = (
        "<h1>Validation report: control all data used by the ML model (ENISA 4.9)</h1>"
        + _section_counts(report) + "<h2>Settings</h2>" + settings + _section_checks(report)
        + _section_outliers(report) + _section_distributions(report)
    )
    document = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>osteo validation report</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")


def _distributions(accepted: pd.DataFrame) -> pd.DataFrame:
    """Quantiles of the numeric statistics and patient features of the accepted records."""
    columns = [c for c in (*STAT_COLUMNS, "age", "bmi") if c in accepted.columns]
    numeric = accepted[columns].apply(pd.to_numeric, errors="coerce")
    quantiles = numeric.quantile([0.0, 0.05, 0.5, 0.95, 1.0]).T
    quantiles.columns = ["min", "p05", "median", "p95", "max"]
    quantiles.insert(0, "count", numeric.count())
    return quantiles


# ---------------------------------------------------------------- the stage


def _settings(params: dict[str, Any], layout: Layout) -> tuple[dict[str, Any], Path]:
    """The validate parameters shown in the report, and the suites directory.

    Raises:
        ConfigError: ``validate.outlier_z`` is missing or not a positive number.
    """
    section = params.get("validate") or {}
    threshold = section.get("outlier_z")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
        raise ConfigError("params.yaml: validate.outlier_z must be a positive number")
    # The project's own suites (a dvc.yaml dependency) win over the ones shipped with osteo.
    suites = section.get("suites") or "expectations"
    suites_dir = layout.root / suites
    if not suites_dir.is_dir() and "suites" not in section:
        suites_dir = SUITES_DIR
    shown = {k: section[k] for k in ("age", "bmi", "sexes", "image_min_side") if k in section}
    return {**shown, "outlier_z": threshold, "suites": str(suites)}, suites_dir


def _read_records(layout: Layout) -> pd.DataFrame:
    path = layout.pseudonymised_records
    if not path.exists():
        raise ValidateError(f"{path} not found: run the pseudonymise stage first")
    return pd.read_parquet(path).reset_index(drop=True)


def _relative(layout: Layout, path: Path) -> str:
    try:
        return str(path.relative_to(layout.root))
    except ValueError:
        return str(path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _StageRun:
    """The records of one run and the failures found so far, per record position.

    Failures are kept in the order they are found (records suite, pixels, images suite,
    outliers); a quarantined record's reason is its first failure.
    """

    def __init__(self, layout: Layout, records: pd.DataFrame, params: dict[str, Any]) -> None:
        self.layout, self.records, self.params = layout, records, params
        self.records_source = _relative(layout, layout.pseudonymised_records)
        shards = records["shard"] if "shard" in records else pd.Series("", index=records.index)
        self.pixel_sources = shards.map(
            lambda shard: _relative(layout, layout.pseudonymised_pixel_dir / str(shard))
        )
        self.failures: dict[Hashable, list[tuple[str, str, str]]] = {}
        self.checks: list[Check] = []
        self.suite_digests: dict[str, str] = {}

    def fail(self, label: Hashable, reason: str, detail: str, source: str) -> None:
        self.failures.setdefault(label, []).append((reason, detail, source))

    def apply_suite(
        self, runner: ExpectationRunner, path: Path, frame: pd.DataFrame, sources: pd.Series,
        table: str,
    ) -> None:
        """Validate ``frame`` (read from ``table``) against the suite file at ``path``."""
        suite = load_suite(path)
        where = f"{table} (suite {path})"
        outcome = runner.run(suite, frame, suite_parameters(suite, self.params), where)
        for label, items in outcome.failures.items():
            for reason, detail in items:
                self.fail(label, reason, detail, str(sources[label]))
        self.checks += outcome.checks
        self.suite_digests[path.name] = _digest(path)

    def pixel_failures(self, stats: pd.DataFrame, unusable: dict[str, str]) -> None:
        """Record the records whose pixels are absent from the shards or cannot be used.

        A record of which ingest could make no model input (``input_reason``, e.g.
        ``uniform_after_window``) has no pixels in the shards and fails with that reason.
        """
        problems = self.records["input_reason"]  # the records suite required the column
        for label, image_id in self.records["image_id"].items():
            if not isinstance(image_id, str) or image_id in stats.index:
                continue
            if isinstance(problems.get(label), str) and problems[label]:
                reason, detail = problems[label], str(self.records.at[label, "input_detail"])
            elif image_id in unusable:
                reason, detail = "image_unusable", unusable[image_id]
            else:
                reason, detail = "image_missing", "its shard holds no member of this name"
            self.fail(label, reason, detail, str(self.pixel_sources[label]))

    def image_frame(self, stats: pd.DataFrame) -> pd.DataFrame:
        """Records with usable statistics: header fields and statistics, by record position."""
        columns = ["image_id", "bits_stored", "rows", "columns", *STAT_COLUMNS]
        return self.records.loc[self.records["image_id"].isin(stats.index), columns]

    def reject_outliers(
        self, threshold: float,
    ) -> tuple[pd.DataFrame, list[FeatureSpread], list[tuple[str, str, float, float]]]:
        """Quarantine the outliers among the records that passed every check so far.

        Returns:
            The accepted records with their statistics, each feature's spread, and one
            ``(image_id, feature, value, z)`` row per outlier for its worst feature.
        """
        passed = self.records.drop(index=list(self.failures))
        outliers, spreads = find_outliers(passed, OUTLIER_FEATURES, threshold)
        rows = []
        for label, items in outliers.items():
            feature, z = max(items, key=lambda item: abs(item[1]))
            detail = ", ".join(f"{name} z={score:+.2f}" for name, score in items)
            self.fail(label, "outlier", f"robust z beyond {threshold}: {detail}",
                      str(self.pixel_sources[label]))
            rows.append((str(passed.at[label, "image_id"]), feature,
                         float(passed.at[label, feature]), z))
        rows.sort(key=lambda row: -abs(row[3]))
        return passed.drop(index=list(outliers)), spreads, rows

    def quarantine(self) -> Quarantine:
        """One quarantine row per failing record: first reason, every failure in the detail."""
        quarantine = Quarantine(STAGE)
        for label in sorted(self.failures, key=self.records.index.get_loc):
            items = self.failures[label]
            image_id = self.records.at[label, "image_id"]
            detail = "; ".join(f"{reason}: {text}" for reason, text, _ in items)
            row = None
            if not isinstance(image_id, str):
                row, image_id = int(self.records.index.get_loc(label)) + 1, ""
                detail = f"record {row} of {self.records_source} (first is 1); {detail}"
            quarantine.add(source=items[0][2], reason=items[0][0], detail=detail, row=row,
                           record_id=image_id)
        return quarantine


@task(name="validate")
def validate(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Run the validate stage for the whole project.

    Args:
        layout: the project's paths.
        params: the content of params.yaml (section ``validate``).

    Returns:
        The stage summary (unit ``image``), also written to ``reports/validate.json``.

    Raises:
        ValidateError: the records table is missing or lacks the pseudonymised columns, or an
            expectation suite is unusable.
        ConfigError: a parameter the suites or the outlier check need is missing.
    """
    started = time.perf_counter()
    settings, suites_dir = _settings(params, layout)
    run = _StageRun(layout, _read_records(layout), params)
    timings: dict[str, float] = {}

    # 1. Records suite first: a table without the pseudonymised columns stops here.
    runner = ExpectationRunner()
    timings["gx_setup_seconds"] = runner.setup_seconds
    mark = time.perf_counter()
    run.apply_suite(runner, suites_dir / "records.json", run.records,
                    pd.Series(run.records_source, index=run.records.index), run.records_source)
    timings["records_suite_seconds"] = time.perf_counter() - mark

    # 2. Per-image statistics, for the images whose pixels are stored.
    mark = time.perf_counter()
    stats, unusable, orphans = recorded_statistics(run.records, layout.pseudonymised_pixel_dir)
    run.pixel_failures(stats, unusable)
    timings["statistics_seconds"] = time.perf_counter() - mark
    if orphans:
        logger.warning("%d image(s) in the shards have no record; not passed on", orphans)

    # 3. Images suite over the statistics.
    mark = time.perf_counter()
    run.apply_suite(runner, suites_dir / "images.json", run.image_frame(stats),
                    run.pixel_sources, "image statistics")
    timings["images_suite_seconds"] = time.perf_counter() - mark

    # 4. Robust outlier rejection over the records that passed both suites.
    accepted, spreads, outlier_rows = run.reject_outliers(settings["outlier_z"])

    # 5. Outputs: validated records, quarantine, summary, HTML report.
    summary = _write_outputs(layout, accepted, run.quarantine(), len(run.records))
    timings["total_seconds"] = time.perf_counter() - started
    summary.extra = {
        "expectations": [_check_counts(check) for check in run.checks],
        "outliers": {s.feature: s.rejected for s in spreads if s.used},
        "outlier_features_not_used": [s.feature for s in spreads if not s.used],
        "orphan_images": orphans,
        "suites_sha256": run.suite_digests,
        "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
    }
    summary.write(layout.summary(STAGE))
    write_html_report(layout.validation_report, ValidationReport(
        summary, run.checks, spreads, outlier_rows, _distributions(accepted), settings,
        run.suite_digests,
    ))
    _log_summary(summary)
    return summary


def _check_counts(check: Check) -> dict[str, Any]:
    return {
        "suite": check.suite, "expectation": check.expectation, "columns": check.columns,
        "reason": check.reason, "success": check.success, "unexpected": check.unexpected,
    }


def _write_outputs(
    layout: Layout, accepted: pd.DataFrame, quarantine: Quarantine, records_in: int,
) -> StageSummary:
    """Write the validated records and the quarantine; return the summary (not yet written)."""
    layout.validated_dir.mkdir(parents=True, exist_ok=True)
    accepted.reset_index(drop=True).to_parquet(layout.validated_records, index=False)
    quarantine.write(layout.quarantine(STAGE))
    outputs = {
        "records": _relative(layout, layout.validated_records),
        "quarantine": _relative(layout, layout.quarantine(STAGE)),
        "report": _relative(layout, layout.validation_report),
    }
    return StageSummary(
        stage=STAGE, records_in=records_in, accepted=len(accepted),
        quarantined=quarantine.by_reason(), unit="image", outputs=outputs,
    )


def _log_summary(summary: StageSummary) -> None:
    timings = summary.extra["timings"]
    logger.info(
        "validate: %d images in, %d accepted, %d quarantined %s in %.1f s "
        "(statistics %.1f s, Great Expectations setup %.1f s)",
        summary.records_in, summary.accepted, summary.quarantined_total,
        summary.quarantined or "", timings["total_seconds"], timings["statistics_seconds"],
        timings["gx_setup_seconds"],
    )
    logger.info("validate: wrote %s", ", ".join(summary.outputs.values()))
