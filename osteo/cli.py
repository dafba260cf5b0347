"""The ``osteo`` command line: one entry point for data engineers, data scientists and auditors.

Each command ends with a summary a person can act on. User mistakes (a bad export, a missing
setting) end with one clear message and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from osteo.logs import configure_logging
from osteo.runlock import project_run

app = typer.Typer(
    help="osteo: osteoporosis probability for X-rays, with patients' data kept private.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger(__name__)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """osteo: osteoporosis probability for X-rays, with patients' data kept private."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)


# ---------------------------------------------------------------- data preparation


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean a user mistake: shown as one message, never a traceback."""
    from models.backbone import WeightsIntegrityError
    from models.data import TrainingDataError
    from models.module import CheckpointError
    from osteo.config import ConfigError
    from osteo.dvc import DvcError
    from osteo.lineage import LineageError
    from osteo.minimise import UndeclaredFieldError
    from osteo.patient_files import PatientFileError
    from osteo.registry import RegistryError
    from osteo.runlock import ProjectBusyError
    from osteo.seaweed import ServerError
    from osteo.vault import VaultError
    from tasks.evaluate import EvaluationError
    from tasks.ingest import ExportError
    from tasks.preprocess import PreprocessError
    from tasks.split import SplitError
    from tasks.validate import ValidateError

    return (ConfigError, DvcError, ServerError, ExportError, SplitError, VaultError,
            ValidateError, PreprocessError, EvaluationError, RegistryError, LineageError,
            UndeclaredFieldError, PatientFileError, WeightsIntegrityError, TrainingDataError,
            CheckpointError, ProjectBusyError)


def _fail(error: Exception) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


DATA_STAGE_NAMES = ("ingest", "pseudonymise", "validate", "preprocess", "split")
MODEL_STAGE_NAMES = ("oracle", "train", "evaluate")


@app.command()
def stage(
    name: str = typer.Argument(..., help="A stage of dvc.yaml, e.g. ingest or train."),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
) -> None:
    """Run one stage in the project directory (what dvc.yaml's stages call)."""
    from osteo.config import load_params
    from osteo.layout import Layout
    from osteo.runtime import prepare_environment

    if name not in DATA_STAGE_NAMES + MODEL_STAGE_NAMES:
        known = ", ".join(DATA_STAGE_NAMES + MODEL_STAGE_NAMES)
        raise _fail(ValueError(f"unknown stage '{name}'; stages: {known}"))
    prepare_environment()
    root = project_dir.resolve()
    try:
        with project_run(root, f"osteo stage {name}"):
            result = _stage_task(name).fn(Layout(root), load_params(root))
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(f"{name}: {_describe(result)}")


def _stage_task(name: str) -> Any:
    """The Prefect task of a stage; model stages are imported only when asked for (torch)."""
    if name in DATA_STAGE_NAMES:
        from flows.prepare import DATA_STAGES

        return DATA_STAGES[name]
    from flows.train import MODEL_STAGES

    return MODEL_STAGES[name]


def _describe(result: Any) -> str:
    """One line on a stage's result, whatever the stage."""
    if hasattr(result, "quarantined_total"):
        return (f"{result.records_in} in, {result.accepted} accepted, "
                f"{result.quarantined_total} quarantined")
    if hasattr(result, "accepted") and hasattr(result, "threshold"):
        decision = "accepted" if result.accepted else "rejected: " + "; ".join(result.reasons)
        return f"threshold {result.threshold:.3f}, model {decision}"
    if hasattr(result, "best_metric"):
        return f"best {result.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}"
    return str(result)


@app.command()
def prepare(
    export: Path = typer.Option(
        None, "--export", help="Hospital export directory (default: params export.path)."
    ),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
    push: bool = typer.Option(
        True, "--push/--no-push", help="Push the dataset to the training store."
    ),
) -> None:
    """Prepare a hospital export into a pseudonymised, validated, split dataset tracked by DVC."""
    from osteo.runtime import prepare_environment, set_param, storage_session

    prepare_environment()
    root = project_dir.resolve()
    if export is not None and not export.is_dir():
        raise _fail(FileNotFoundError(f"export directory {export} does not exist"))
    try:
        with project_run(root, "osteo prepare"):
            if export is not None:
                set_param(root, "export.path", _relative_to(export.resolve(), root))
            with storage_session(root):
                summary = _run_preparation(root, push)
    except _user_errors() as error:
        raise _fail(error) from None
    _print_preparation(summary)


def _relative_to(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _run_preparation(root: Path, push: bool) -> Any:
    from flows.prepare import prepare_dataset
    from osteo import dvc

    dvc.init_project(root)
    return prepare_dataset(str(root), push=push)


def _print_preparation(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Data preparation", show_lines=False)
    for column in ("stage", "in", "accepted", "quarantined", "reasons"):
        table.add_column(
            column, justify="right" if column in {"in", "accepted", "quarantined"} else "left"
        )
    for s in summary.stages:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.quarantined.items()))
        table.add_row(
            s.stage, str(s.records_in), str(s.accepted), str(s.quarantined_total), reasons
        )
    console = Console()
    console.print(table)
    annotations = summary.stages[0].extra.get("annotations", {})
    if annotations:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(annotations["quarantined"].items()))
        readers = summary.stages[0].extra.get("readers", {})
        console.print(
            f"annotations in {annotations['in']} = used {annotations['used']} + quarantined "
            f"{sum(annotations['quarantined'].values())} ({reasons or 'none'}); "
            f"readers disagreed on {readers.get('images_with_disagreement', 0)} images"
        )
    console.print(
        f"records in {summary.records_in} = accepted {summary.accepted} + quarantined "
        f"{summary.quarantined_total}  ({summary.seconds:.1f} s)"
    )
    console.print(
        f"dataset version {summary.data_version}; quarantine in data/quarantine/; "
        f"report reports/validation.html; remote {summary.remote or 'not pushed'}"
    )



@app.command()
def train(
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
    prepare: bool = typer.Option(
        True, "--prepare/--no-prepare",
        help="Prepare the export first, or pull the dataset recorded in dvc.lock.",
    ),
    push: bool = typer.Option(True, "--push/--no-push", help="Push data and model with DVC."),
) -> None:
    """Train, evaluate and register a model; promote it only if it meets the criteria."""
    from osteo.runtime import prepare_environment, storage_session

    prepare_environment()
    root = project_dir.resolve()
    try:
        with project_run(root, "osteo train"), storage_session(root):
            summary = _run_training(root, prepare, push)
    except _user_errors() as error:
        raise _fail(error) from None
    if summary.preparation is not None:
        _print_preparation(summary.preparation)
    _print_training(summary)


@app.command()
def demo(
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
    patients: int | None = typer.Option(
        None, "--patients", min=20, help="Patients in the export (default: generate.patients)."
    ),
    regenerate: bool = typer.Option(False, "--regenerate", help="Write the export anew."),
    push: bool = typer.Option(True, "--push/--no-push", help="Push data and model with DVC."),
) -> None:
    """The whole system on a synthetic clinic: export, data preparation, model, registry.

    Starts the embedded S3 server when OSTEO_S3_ENDPOINT is not set.
    """
    from osteo.config import load_params
    from osteo.runtime import prepare_environment, set_param, storage_session
    from osteo.synthetic import default_truth_path, generate_from_params

    prepare_environment()
    root = project_dir.resolve()
    export = root / "exports" / "demo"
    try:
        with project_run(root, "osteo demo"):
            # 1. The synthetic export (kept between runs unless --regenerate).
            if regenerate or not (export / "patients.csv").exists():
                params = load_params(root)
                count = patients or params["generate"]["patients"]
                typer.echo(f"generating a synthetic export of {count} patients in {export}")
                generate_from_params(params, export, patients=count, force=True)
            set_param(root, "export.path", _relative_to(export, root))
            set_param(root, "export.truth", _relative_to(default_truth_path(export), root))

            # 2. Data preparation, training, evaluation and registration.
            with storage_session(root):
                summary = _run_training(root, True, push)
    except _user_errors() as error:
        raise _fail(error) from None
    _print_preparation(summary.preparation)
    _print_training(summary)


def _run_training(root: Path, prepare: bool, push: bool) -> Any:
    from flows.train import train_model
    from osteo import dvc

    dvc.init_project(root)
    return train_model(str(root), prepare=prepare, push=push)


def _print_training(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = summary.evaluation.metrics
    test = metrics.get("test", {})
    table = Table(title=f"Model {summary.version}")
    table.add_column("test metric")
    table.add_column("value", justify="right")
    table.add_column("95 % CI", justify="right")
    for name in ("auc", "recall", "specificity", "precision", "f1", "accuracy"):
        value = test.get(name)
        interval = (metrics.get("ci95", {}) or {}).get(name) or {}
        low, high = interval.get("low"), interval.get("high")
        table.add_row(name, _fmt(value), f"{_fmt(low)} – {_fmt(high)}" if low is not None else "")
    console = Console()
    console.print(table)
    oracle = metrics.get("oracle", {}) or {}
    if oracle.get("auc") is not None:
        console.print(f"oracle AUC (true T-score) {_fmt(oracle.get('auc'))}, "
                      f"model - oracle {_fmt(oracle.get('auc_gap'))}")
    decision = "ACCEPTED" if summary.evaluation.accepted else "REJECTED"
    console.print(f"threshold {summary.evaluation.threshold:.3f}; model {decision}"
                  + ("" if summary.evaluation.accepted
                     else ": " + "; ".join(summary.evaluation.reasons)))
    console.print(f"registry version {summary.version}; champion {summary.champion}; "
                  f"data version {summary.data_version}; model card reports/model_card.md; "
                  f"training {summary.training.seconds:.0f} s")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"



@app.command("review-export")
def review_export(
    out_dir: Path = typer.Argument(..., help="New directory for the de-identified DICOM files."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
) -> None:
    """De-identified DICOM copies of a split's radiographs for an external review (4.24)."""
    from osteo.config import load_params
    from osteo.layout import Layout
    from tasks.review import export_for_review

    if split not in {"train", "val", "test", "all"}:
        raise _fail(ValueError(f"--split {split}: choose train, val, test or all"))
    root = project_dir.resolve()
    try:
        result = export_for_review(Layout(root), load_params(root), out_dir,
                                   None if split == "all" else split)
    except _user_errors() as error:
        raise _fail(error) from None
    left_out = ", ".join(f"{r} {n}" for r, n in sorted(result.excluded.items())) or "none"
    typer.echo(f"{result.written} de-identified DICOM files in {result.out_dir}; "
               f"left out: {left_out} (see excluded.csv)")


# ---------------------------------------------------------------- access matrix

access_app = typer.Typer(
    help="The access matrix (infra/access.yaml) and what is generated from it."
)
app.add_typer(access_app, name="access")


@access_app.command("table")
def access_table() -> None:
    """Print the access matrix as a Markdown table (as shown in README.md)."""
    from osteo.access import markdown_table
    from osteo.config import load_access_matrix

    typer.echo(markdown_table(load_access_matrix()))


@access_app.command("render-minio")
def access_render_minio(
    out_dir: Path = typer.Option(Path("infra/minio"), "--out", help="Where to write policies."),
) -> None:
    """Write one MinIO policy per role and the mc setup script, generated from the matrix."""
    import json

    from osteo.access import minio_policy, minio_setup_script
    from osteo.config import load_access_matrix

    matrix = load_access_matrix()
    (out_dir / "policies").mkdir(parents=True, exist_ok=True)
    for role in matrix["roles"]:
        policy = json.dumps(minio_policy(matrix, role), indent=2) + "\n"
        (out_dir / "policies" / f"{role}.json").write_text(policy)
    (out_dir / "setup.sh").write_text(minio_setup_script(matrix))
    typer.echo(f"wrote {len(matrix['roles'])} policies and setup.sh to {out_dir}")


# ---------------------------------------------------------------- audit trail (control 4.16)

audit_app = typer.Typer(
    help="Audit trail: verify its integrity, and show who accessed what, and when.",
    no_args_is_help=True,
)


@audit_app.command("verify")
def audit_verify(
    log: str = typer.Option("s3", "--log", help="'s3' (the audit store) or an exported log dir."),
    expect_head: str | None = typer.Option(
        None, "--expect-head", help="Hash of a record seen before, e.g. the last checkpoint."
    ),
    expect_seq: int | None = typer.Option(None, "--expect-seq", help="Its sequence number."),
    public_key: str | None = typer.Option(
        None, "--public-key", help="Pinned public key (PEM file); default: the published one."
    ),
    role: str = typer.Option("auditor", "--role", help="Role reading the audit store."),
) -> None:
    """Check the hash chain, signatures and checkpoints; exit 1 naming the first broken record."""
    from osteo.audit import AuditError, open_log
    from osteo.config import ConfigError

    try:
        pinned = Path(public_key).read_bytes() if public_key else None
        with _audit_storage(log):
            result = open_log(log, role).verify(expect_head, expect_seq, pinned)
    except (ConfigError, AuditError, OSError) as error:
        raise _fail(error) from None
    key = "pinned key" if result.key_pinned else "published key"
    if not result.ok:
        typer.echo(f"audit log BROKEN at record {result.first_broken_seq}: {result.reason} "
                   f"({result.count} intact records before it; {key})")
        raise typer.Exit(1)
    typer.echo(f"audit log intact: {result.count} records, {result.checkpoints} checkpoints, "
               f"head {result.head_seq} {result.head_hash} ({key})")


@audit_app.command("show")
def audit_show(
    object_key: str | None = typer.Option(None, "--object", help="Only this object's key."),
    actor: str | None = typer.Option(None, "--actor", help="Only this actor."),
    since: str | None = typer.Option(None, "--since", help="ISO date or time (UTC)."),
    log: str = typer.Option("s3", "--log", help="'s3' (the audit store) or an exported log dir."),
    role: str = typer.Option("auditor", "--role", help="Role reading the audit store."),
) -> None:
    """Who accessed what, and when: the matching records as a table."""
    from datetime import datetime

    from rich.console import Console
    from rich.table import Column, Table

    from osteo.audit import AuditError, open_log
    from osteo.config import ConfigError

    try:
        start = datetime.fromisoformat(since) if since else None
        with _audit_storage(log):
            records = open_log(log, role).query(object_key, actor, start)
    except ValueError:
        raise _fail(ValueError(f"--since {since} is not an ISO date or time")) from None
    except (ConfigError, AuditError) as error:
        raise _fail(error) from None
    last = "sha256" if object_key else "objects"
    table = Table(*(Column(h, overflow="fold") for h in
                    ("seq", "time (UTC)", "actor", "role", "action", "run", last)))
    for record in records:
        if object_key:
            shown = ", ".join((o.sha256 or "-")[:16] for o in record.objects if o.key == object_key)
        else:
            keys = [o.key for o in record.objects]
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
        table.add_row(str(record.seq), record.time, record.actor, record.role, record.action,
                      record.run_id or "", shown)
    Console().print(table)
    typer.echo(f"{len(records)} matching records (run 'osteo audit verify' to check integrity)")


def _audit_storage(log: str) -> Any:
    """The audit store's endpoint: the configured one, or the embedded server of this project."""
    from contextlib import nullcontext

    from osteo.runtime import prepare_environment, storage_session

    if log != "s3":
        return nullcontext()
    prepare_environment()
    return storage_session(Path.cwd())


app.add_typer(audit_app, name="audit")


# ---------------------------------------------------------------- synthetic clinic


@app.command()
def generate(
    out_dir: Path = typer.Argument(..., help="Export directory to write; must be empty."),
    patients: int | None = typer.Option(
        None, "--patients", min=1, help="Number of patients (default: params generate.patients)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, help="Random seed (default: params generate.seed)."
    ),
    truth: Path | None = typer.Option(
        None, "--truth", help="Ground-truth CSV, outside the export (default: OUT_DIR.truth.csv)."
    ),
    png_fraction: float | None = typer.Option(
        None, "--png-fraction", min=0.0, max=1.0,
        help="Share of images written as 16-bit PNG (default: params generate.png_fraction).",
    ),
    params: Path | None = typer.Option(
        None, "--params", help="Parameters file (default: ./params.yaml, else built-in defaults)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a previous export in OUT_DIR."),
) -> None:
    """Write a synthetic hospital export (patients, radiographs, readings) and its ground truth.

    The same seed gives the same files. The ground truth, for evaluation only, goes outside.
    """
    from osteo.config import ConfigError
    from osteo.synthetic import generate_from_params

    try:
        summary = generate_from_params(
            _generation_params(params), out_dir, patients=patients, seed=seed,
            png_fraction=png_fraction, truth_path=truth, force=force,
        )
    except (ConfigError, PermissionError) as error:
        raise _fail(error) from None
    typer.echo(
        f"generated {summary.patients} patients ({summary.patients_by_sex['F']} F, "
        f"{summary.patients_by_sex['M']} M), {summary.images} images ({summary.dicom_files} "
        f"DICOM, {summary.png_files} PNG), {summary.annotations} annotations "
        f"in {summary.seconds:.1f} s"
    )
    typer.echo(
        f"  readings: {summary.adjudications} images adjudicated by a third accredited reader, "
        f"{summary.unaccredited_annotations} annotations by unaccredited readers"
    )
    typer.echo(
        f"  true osteoporosis prevalence: women {summary.prevalence('F'):.1%}, "
        f"men {summary.prevalence('M'):.1%}"
    )
    typer.echo(f"  export       -> {summary.out_dir}")
    typer.echo(f"  ground truth -> {summary.truth_path} (evaluation only)")


def _generation_params(path: Path | None) -> dict[str, Any]:
    """The parameters the generator reads: the given file, ./params.yaml, or none (defaults)."""
    import yaml

    from osteo.config import ConfigError

    if path is None:
        path = Path("params.yaml")
        if not path.exists():
            return {}
    if not path.is_file():
        raise _fail(ConfigError(f"parameters file {path} not found"))
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise _fail(ConfigError(f"{path} is not valid YAML: {error}")) from None
    return loaded if isinstance(loaded, dict) else {}


# ---------------------------------------------------------------- control evidence (ENISA 4.x)

controls_app = typer.Typer(
    help="ENISA controls 4.1-4.29: how osteo implements each one, and the evidence."
)
app.add_typer(controls_app, name="controls")


@controls_app.callback(invoke_without_command=True)
def controls_show(
    ctx: typer.Context,
    junit: Path | None = typer.Option(
        None, "--junit", help="JUnit report of the latest test run "
        "(default: reports/tests/junit.xml in the project directory)."
    ),
    run: bool = typer.Option(False, "--run", help="Run the evidencing tests now (pytest)."),
    output_format: str = typer.Option("table", "--format", help="'table' or 'json'."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1 when a technical control's tests failed or did not run."
    ),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="Where reports/ is."),
) -> None:
    """Every control with its evidence and the latest result of its tests."""
    import json
    import sys

    from rich.console import Console

    from osteo import controls as evidence
    from osteo.config import PACKAGE_ROOT

    if ctx.invoked_subcommand is not None:
        return
    if output_format not in ("table", "json"):
        raise _fail(ValueError(f"--format {output_format}: use 'table' or 'json'"))
    report = (junit or project_dir / evidence.DEFAULT_JUNIT).resolve()
    try:
        controls = evidence.load_controls(PACKAGE_ROOT / evidence.CONTROLS_FILE)
        if run:
            out = sys.stderr if output_format == "json" else None
            evidence.run_evidence_tests(controls, report, PACKAGE_ROOT, out)
        test_run = evidence.read_junit(report)
    except evidence.ControlsError as error:
        raise _fail(error) from None
    results = evidence.assess(controls, test_run, project_dir, PACKAGE_ROOT)
    if output_format == "json":
        typer.echo(json.dumps(evidence.results_document(results, test_run), indent=2))
    else:
        Console().print(evidence.results_table(results))
        typer.echo(f"test report {report}: " + (
            f"{len(test_run.cases)} test cases, run {test_run.timestamp}" if test_run else
            "none yet (run ./dev test, or osteo controls --run)"))
    problems = evidence.check_map(controls, PACKAGE_ROOT)
    for problem in problems:
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)
    if strict and (problems or any(result.evidence_failed for result in results)):
        raise typer.Exit(1)


@controls_app.command("docs")
def controls_docs(
    check: bool = typer.Option(
        False, "--check", help="Exit 1 when a section is out of date (the default)."
    ),
    write: bool = typer.Option(False, "--write", help="Rewrite the out-of-date sections."),
) -> None:
    """Check or regenerate the repository facts in docs/*.md (DPIA, LIA, registers)."""
    from osteo import controls as evidence
    from osteo.config import PACKAGE_ROOT

    if check and write:
        raise _fail(ValueError("use either --check or --write"))
    try:
        if write:
            changed = evidence.write_documents(PACKAGE_ROOT)
            typer.echo(f"regenerated: {', '.join(changed)}" if changed else "already up to date")
            return
        drifted = evidence.check_documents(PACKAGE_ROOT)
    except evidence.ControlsError as error:
        raise _fail(error) from None
    for problem in drifted:
        typer.echo(f"out of date: {problem}")
    if drifted:
        typer.echo("run 'osteo controls docs --write' and review the change")
        raise typer.Exit(1)
    typer.echo(f"generated sections of {len(evidence.DOCUMENTS)} documents are up to date")


# ---------------------------------------------------------------- retention (control 4.19)


@app.command()
def retention(
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Report what would be deleted; delete nothing."
    ),
    now: str | None = typer.Option(
        None, "--now", metavar="YYYY-MM-DD", help="Day to measure the periods against (UTC); "
        "default today. A later day shows what will expire by then."
    ),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
) -> None:
    """Delete what has outlived its retention period in every store (params.yaml retention).

    Training data, production cases, patient files and identity-vault entries; every deletion
    is an audit record, and the report goes to reports/retention.json.
    """
    from datetime import UTC, datetime

    from osteo.audit import AuditError
    from osteo.lineage import LineageError
    from osteo.patient_files import PatientFileError
    from osteo.runtime import prepare_environment, storage_session
    from tasks.retention import RetentionError

    try:
        day = datetime.strptime(now, "%Y-%m-%d").replace(tzinfo=UTC) if now else None
    except ValueError:
        raise _fail(ValueError(f"--now {now} is not a date YYYY-MM-DD")) from None
    prepare_environment()
    root = project_dir.resolve()
    errors = _user_errors() + (AuditError, LineageError, PatientFileError, RetentionError)
    try:
        with project_run(root, "osteo retention"), storage_session(root):
            from flows.retention import apply_retention

            report = apply_retention(str(root), now=day, dry_run=dry_run)
    except errors as error:
        raise _fail(error) from None
    _print_retention(report, root)


def _print_retention(report: Any, root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"Retention on {report.today}" + (" (dry run: nothing deleted)" if report.dry_run
                                               else "")
    table = Table(title=title)
    table.add_column("store", no_wrap=True)
    table.add_column("acting role", no_wrap=True)
    for column in ("days", "scanned", "expired", "deleted", "bytes", "in use"):
        table.add_column(column, justify="right")
    for s in report.stores:
        table.add_row(s.store, s.role, str(s.retention_days), str(s.scanned), str(s.expired),
                      str(s.deleted), str(s.bytes), str(s.kept_in_use))
    console = Console()
    console.print(table)
    for s in report.stores:
        if s.note:
            console.print(f"{s.store}: {s.note}")
    console.print(f"report {root / 'reports' / 'retention.json'}; audit run {report.run_id}, "
                  f"checkpoint at record {report.audit_seq}")
