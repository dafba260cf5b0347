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
    from tasks.ingest import ExportError
    from tasks.split import SplitError

    from osteo.config import ConfigError
    from osteo.dvc import DvcError
    from osteo.seaweed import ServerError

    return (ConfigError, DvcError, ServerError, ExportError, SplitError)


def _fail(error: Exception) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def stage(
    name: str = typer.Argument(..., help="ingest, pseudonymise, validate, preprocess or split"),
    project_dir: Path = typer.Option(Path("."), "--project-dir", help="DVC project directory."),
) -> None:
    """Run one data stage in the project directory (what dvc.yaml's stages call)."""
    from flows.prepare import DATA_STAGES, run_stage
    from osteo.runtime import prepare_environment

    if name not in DATA_STAGES:
        raise _fail(ValueError(f"unknown stage '{name}'; stages: {', '.join(DATA_STAGES)}"))
    prepare_environment()
    try:
        summary = run_stage(name, project_dir.resolve())
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(
        f"{name}: {summary.records_in} in, {summary.accepted} accepted, "
        f"{summary.quarantined_total} quarantined"
    )


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
    if export is not None:
        if not export.is_dir():
            raise _fail(FileNotFoundError(f"export directory {export} does not exist"))
        set_param(root, "export.path", _relative_to(export.resolve(), root))
    try:
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
    console.print(
        f"records in {summary.records_in} = accepted {summary.accepted} + quarantined "
        f"{summary.quarantined_total}  ({summary.seconds:.1f} s)"
    )
    console.print(
        f"dataset version {summary.data_version}; quarantine in data/quarantine/; "
        f"report reports/validation.html; remote {summary.remote or 'not pushed'}"
    )


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
