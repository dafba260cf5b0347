"""Control evidence: how osteo implements each ENISA control, and what proves it.

Section 4 of ENISA's report lists 29 cybersecurity and privacy controls (4.1 to 4.29). The
evidence map ``docs/controls.yaml`` gives each one its kind (technical or organisational), its
status, one sentence on how osteo implements it, what is missing, and its evidence: the tests
that prove it, the reports a pipeline run writes and the documents of ``docs/``. This module:

1. reads and checks the evidence map (``load_controls``, ``check_map``: every control once,
   every named test file and test function present);
2. reads the JUnit XML report of the latest test run (``read_junit``; ``./dev test`` writes
   ``reports/tests/junit.xml``) or runs the evidencing tests now (``run_evidence_tests``), and
   gives each technical control its latest result (``assess``);
3. generates the facts of the organisational documents (DPIA, LIA, data-processor register,
   retention policy, data controller) from the repository: stores, buckets, roles, fields per
   store, retention periods, data flows, services. They sit between ``<!-- generated:NAME -->``
   and ``<!-- /generated -->`` markers; ``check_documents`` reports every section that differs
   from the repository (a bucket renamed in ``infra/access.yaml`` but not in the DPIA) and
   ``write_documents`` rewrites them.

It documents the diagnostic system (control 4.2) and gives the data-protection officer the
material of controls 4.14 (data controller), 4.17 (data processors), 4.18 (privacy impact
assessment), 4.19 (retention policy), 4.20 (data fields) and 4.21 (legitimate interest).

Reads ``docs/controls.yaml``, ``docs/*.md``, ``infra/access.yaml``, ``infra/fields.yaml``,
``infra/docker-compose.yml``, ``params.yaml``, ``dvc.yaml``, ``.dvc/config`` and the JUnit file;
writes the JUnit file (through pytest, when asked to run the tests) and the generated sections
of the documents (when asked to).
"""

from __future__ import annotations

import ast
import configparser
import logging
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from rich.table import Table

from osteo.access import markdown_table

logger = logging.getLogger(__name__)

CONTROLS_FILE = Path("docs") / "controls.yaml"
DEFAULT_JUNIT = Path("reports") / "tests" / "junit.xml"
DOCUMENTS = (
    "docs/dpia.md", "docs/lia.md", "docs/processors.md", "docs/retention-policy.md",
    "docs/data-controller.md",
)
CONTROL_IDS = tuple(f"4.{number}" for number in range(1, 30))
KINDS = ("technical", "organisational")
STATUSES = ("implemented", "partial", "not implemented", "to complete")
FIELDS = ("id", "title", "kind", "status", "statement", "tests", "reports", "documents", "gap")
# An item left to the practice; written in backquotes, the words only name the marker.
OPEN_ITEM = re.compile(r"(?<!`)\bTO (?:FILL|CONFIRM)\b")
SECTION = re.compile(
    r"<!-- generated:(?P<name>[a-z][a-z0-9-]*) -->\n(?P<body>.*?)<!-- /generated -->", re.S
)
INTENDED_RETENTION = (
    ("training", "pseudonymised training data (research data)", "2 years"),
    ("retraining", "pseudonymised production cases", "2 years"),
    ("identity_vault", "pseudonym to identity correspondence", "as long as the data it maps"),
    ("patient_files", "identifiable patient files (legal disputes)", "20 years"),
)


class ControlsError(Exception):
    """The evidence map, a test report or a document is unusable; the message names the file."""


# ---------------------------------------------------------------- the evidence map


@dataclass(frozen=True)
class Control:
    """One control of the report and its evidence in osteo.

    Attributes:
        id: the report's number, e.g. ``"4.15"``.
        title: the report's heading.
        kind: ``technical`` or ``organisational``.
        status: ``implemented``, ``partial``, ``not implemented`` or ``to complete``.
        statement: how osteo implements it, in one sentence.
        tests: pytest node ids proving it (``file``, ``file::test`` or ``file::Class::test``).
        reports: files a pipeline run writes, relative to the project directory.
        documents: documents of the repository, relative to its root.
        gap: what is missing and its consequence.
    """

    id: str
    title: str
    kind: str
    status: str
    statement: str
    tests: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()
    gap: str | None = None


def load_controls(path: Path) -> list[Control]:
    """Read the evidence map.

    Args:
        path: the map, normally ``docs/controls.yaml`` of the repository.

    Returns:
        The controls in the file's order.

    Raises:
        ControlsError: when the file is missing, not YAML, or an entry is incomplete or
            inconsistent (the message names the control).
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ControlsError(f"{path}: cannot read the evidence map ({error})") from None
    entries = document.get("controls") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ControlsError(f"{path}: expected a 'controls' list")
    return [_control(path, position, entry) for position, entry in enumerate(entries, start=1)]


def _control(path: Path, position: int, entry: Any) -> Control:
    """One entry of the map, checked."""
    if not isinstance(entry, dict):
        raise ControlsError(f"{path}: entry {position} is not a mapping")
    name = f"{path}: control {entry.get('id', f'#{position}')}"
    unknown = sorted(set(entry) - set(FIELDS))
    missing = [key for key in ("id", "title", "kind", "status", "statement") if not entry.get(key)]
    if unknown or missing:
        raise ControlsError(f"{name}: unknown fields {unknown}, missing fields {missing}")
    control = Control(
        id=str(entry["id"]), title=_text(entry["title"]), kind=str(entry["kind"]),
        status=str(entry["status"]), statement=_text(entry["statement"]),
        tests=tuple(entry.get("tests") or ()), reports=tuple(entry.get("reports") or ()),
        documents=tuple(entry.get("documents") or ()),
        gap=_text(entry["gap"]) if entry.get("gap") else None,
    )
    problem = _inconsistency(control)
    if problem:
        raise ControlsError(f"{name}: {problem}")
    return control


def _text(value: Any) -> str:
    """A YAML string on one line."""
    return " ".join(str(value).split())


def _inconsistency(control: Control) -> str | None:
    """Why a control's kind, status and evidence do not fit together, or None."""
    if control.kind not in KINDS:
        return f"kind '{control.kind}' is not one of {', '.join(KINDS)}"
    if control.status not in STATUSES:
        return f"status '{control.status}' is not one of {', '.join(STATUSES)}"
    if control.status in ("partial", "not implemented") and not control.gap:
        return f"a {control.status} control needs its 'gap' (what is missing, consequence)"
    if control.kind == "technical" and control.status != "not implemented":
        if not control.tests:
            return f"a technical {control.status} control needs 'tests'"
    if control.status == "not implemented" and control.tests:
        return "a control that is not implemented cannot name tests as its evidence"
    if control.kind == "organisational" and not control.documents:
        return "an organisational control needs 'documents'"
    if control.status == "to complete" and control.kind != "organisational":
        return "only organisational controls are 'to complete'"
    return None


def check_map(controls: list[Control], root: Path) -> list[str]:
    """Check that the map covers section 4 once and that its evidence exists.

    Args:
        controls: the loaded evidence map.
        root: the repository root, where ``tests/`` and ``docs/`` are.

    Returns:
        One message per problem; empty when the map is complete and every test file, named
        test and document exists.
    """
    ids = [control.id for control in controls]
    problems = [f"control {cid} is missing" for cid in CONTROL_IDS if cid not in ids]
    problems += [f"control {cid} appears {ids.count(cid)} times"
                 for cid in sorted(set(ids)) if ids.count(cid) > 1]
    problems += [f"control {cid} is not in section 4 (4.1 to 4.29)"
                 for cid in sorted(set(ids) - set(CONTROL_IDS))]
    for control in controls:
        problems += [f"control {control.id}: {message}"
                     for message in _missing_evidence(control, root)]
    return problems


def _missing_evidence(control: Control, root: Path) -> list[str]:
    """The tests and documents a control names that do not exist."""
    missing = [f"document {doc} does not exist"
               for doc in control.documents if not (root / doc).is_file()]
    for node in control.tests:
        path, *names = node.split("::")
        if not path.startswith("tests/") or not path.endswith(".py"):
            missing.append(f"{node} is not a test file under tests/")
        elif not (root / path).is_file():
            missing.append(f"test file {path} does not exist")
        elif names and "::".join(names) not in defined_tests(root / path):
            missing.append(f"{node}: no such test in {path}")
    return missing


def defined_tests(path: Path) -> set[str]:
    """The test functions and classes a test file defines, as node id suffixes.

    Args:
        path: a pytest file.

    Returns:
        ``name`` for module-level functions and classes, ``Class::method`` for methods.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))
    return names


# ---------------------------------------------------------------- test results (JUnit XML)


@dataclass(frozen=True)
class TestCase:
    """One test case of a JUnit report.

    Attributes:
        classname: dotted module path (and class), e.g. ``tests.osteo.test_audit``.
        name: the test name, with its parameters in brackets when parametrised.
        outcome: ``passed``, ``failed`` (failure or error) or ``skipped``.
    """

    __test__ = False  # not a pytest class, despite its name

    classname: str
    name: str
    outcome: str


@dataclass(frozen=True)
class TestRun:
    """The test cases of one JUnit report.

    Attributes:
        path: the JUnit file.
        timestamp: when the run started, as the report gives it (ISO 8601), or None.
        cases: every test case of the report.
    """

    __test__ = False

    path: Path
    timestamp: str | None
    cases: tuple[TestCase, ...]


def read_junit(path: Path) -> TestRun | None:
    """Read a JUnit XML report as pytest's ``--junitxml`` writes it.

    Args:
        path: the report file.

    Returns:
        The run, or None when the file does not exist (no test run recorded yet).

    Raises:
        ControlsError: when the file is not a JUnit XML report.
    """
    if not path.is_file():
        return None
    try:
        # The report is written by the project's own pytest run, not by an outside party.
        root = ElementTree.parse(path).getroot()  # noqa: S314
    except (ElementTree.ParseError, OSError) as error:
        raise ControlsError(f"{path} is not a JUnit XML report ({error})") from None
    if root.tag not in ("testsuite", "testsuites"):
        raise ControlsError(f"{path} is not a JUnit XML report (root element <{root.tag}>)")
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases = tuple(
        TestCase(case.get("classname", ""), case.get("name", ""), _outcome(case))
        for suite in suites for case in suite.iter("testcase")
    )
    timestamp = suites[0].get("timestamp") if suites else None
    return TestRun(path=path, timestamp=timestamp, cases=cases)


def _outcome(case: ElementTree.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    if case.find("skipped") is not None:
        return "skipped"
    return "passed"


def matches(node: str, case: TestCase) -> bool:
    """Whether a JUnit test case belongs to a pytest node id.

    Args:
        node: ``file``, ``file::test`` or ``file::Class::test``, relative to the repository.
        case: a test case of a JUnit report.

    Returns:
        True for the node's own cases (every parametrisation of a named test, every test of a
        file) and for the collection error of its file.
    """
    path, *names = node.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    if case.classname == "" and case.name == module:
        return True
    if not names:
        return case.classname == module or case.classname.startswith(module + ".")
    classname = ".".join([module, *names[:-1]])
    test = names[-1]
    return case.classname == classname and (case.name == test or case.name.startswith(test + "["))


def evidence_nodes(controls: Iterable[Control]) -> list[str]:
    """Every node id the controls name, without those inside a file also named whole."""
    nodes = sorted({node for control in controls for node in control.tests})
    files = {node for node in nodes if "::" not in node}
    return [node for node in nodes if "::" not in node or node.split("::")[0] not in files]


def run_evidence_tests(
    controls: Iterable[Control], junit: Path, root: Path, output: TextIO | None = None
) -> int:
    """Run every evidencing test now, writing a JUnit report.

    Args:
        controls: the evidence map.
        junit: the JUnit file to write.
        root: the repository root, where pytest runs.
        output: where pytest's own output goes (a real file such as ``sys.stderr``); None
            leaves it on the terminal.

    Returns:
        pytest's exit code (0 all passed, 1 some failed, other values: see pytest).
    """
    # 1. A previous report must not pass for this run's if pytest stops before writing one.
    junit.unlink(missing_ok=True)

    # 2. One pytest run over every evidence entry.
    nodes = evidence_nodes(controls)
    command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}", *nodes]
    logger.info("running the tests of %d evidence entries; report %s", len(nodes), junit)
    completed = subprocess.run(  # noqa: S603 - this interpreter, node ids from the evidence map
        command, cwd=root, check=False, stdout=output
    )
    return completed.returncode


# ---------------------------------------------------------------- results per control


@dataclass(frozen=True)
class ReportFile:
    """A report named as evidence: whether a pipeline run wrote it, and when.

    Attributes:
        path: relative to the project directory.
        modified: modification time (local, ISO 8601 to the minute), None when missing.
    """

    path: str
    modified: str | None


@dataclass(frozen=True)
class DocumentState:
    """A document named as evidence, and how many items are left for the practice.

    Attributes:
        path: relative to the repository root.
        exists: whether the file exists.
        open_items: occurrences of ``TO FILL`` and ``TO CONFIRM`` in a document the practice
            completes (``DOCUMENTS``); 0 for the others.
    """

    path: str
    exists: bool
    open_items: int


@dataclass(frozen=True)
class ControlResult:
    """The latest result of one control.

    Attributes:
        control: the control.
        state: ``passed``, ``failed``, ``partly run``, ``skipped``, ``not run`` (controls with
            tests), else the control's status.
        passed: test cases passed.
        total: test cases found in the report for the control's tests.
        failed: names of the failed test cases.
        skipped: test cases skipped.
        not_run: evidence node ids no test case of the report belongs to.
        reports: the reports named as evidence.
        documents: the documents named as evidence.
    """

    control: Control
    state: str
    passed: int = 0
    total: int = 0
    failed: tuple[str, ...] = ()
    skipped: int = 0
    not_run: tuple[str, ...] = ()
    reports: tuple[ReportFile, ...] = ()
    documents: tuple[DocumentState, ...] = ()

    @property
    def evidence_failed(self) -> bool:
        """True when the control has tests and they did not all run and pass."""
        return bool(self.control.tests) and self.state != "passed"

    def summary(self) -> str:
        """The latest result in words, one line per piece of evidence."""
        if self.control.tests:
            lines = [self._tests_line()]
        elif self.control.status == "not implemented":
            lines = [f"not implemented: {self.control.gap}"]
        else:
            lines = [self.control.status]
        lines += [f"{r.path} {r.modified}" if r.modified else f"{r.path} missing"
                  for r in self.reports]
        lines += [_document_line(doc) for doc in self.documents]
        return "\n".join(line for line in lines if line)

    def _tests_line(self) -> str:
        if self.state == "not run":
            return "not run"
        if self.failed:
            shown = ", ".join(self.failed[:3]) + (f" (+{len(self.failed) - 3})"
                                                  if len(self.failed) > 3 else "")
            line = f"FAILED {len(self.failed)}/{self.total}: {shown}"
        else:
            line = f"passed {self.passed}/{self.total}"
        if self.skipped:
            line += f", skipped {self.skipped}"
        if self.not_run:
            line += "; not run: " + ", ".join(self.not_run)
        return line


def _document_line(document: DocumentState) -> str:
    if not document.exists:
        return f"{document.path} missing"
    if document.open_items:
        return f"{document.path}: {document.open_items} items to fill or confirm"
    return f"{document.path}: complete" if document.path in DOCUMENTS else ""


def assess(
    controls: Iterable[Control], run: TestRun | None, project_dir: Path, root: Path
) -> list[ControlResult]:
    """Give each control its latest result.

    Args:
        controls: the evidence map.
        run: the latest test run, or None when none is recorded.
        project_dir: where the pipeline's reports are.
        root: the repository root, where the documents are.

    Returns:
        One result per control, in the map's order.
    """
    cases = run.cases if run else ()
    return [_assess_one(control, cases, project_dir, root) for control in controls]


def _assess_one(
    control: Control, cases: tuple[TestCase, ...], project_dir: Path, root: Path
) -> ControlResult:
    # 1. The test cases of each evidence entry.
    per_node = {node: [case for case in cases if matches(node, case)] for node in control.tests}
    found = {(case.classname, case.name): case
             for matched in per_node.values() for case in matched}
    outcomes = [case.outcome for case in found.values()]

    # 2. What was not run, failed or skipped.
    not_run = tuple(node for node, matched in per_node.items() if not matched)
    failed = tuple(sorted(case.name or case.classname
                          for case in found.values() if case.outcome == "failed"))
    passed, skipped = outcomes.count("passed"), outcomes.count("skipped")

    # 3. The state and the other evidence.
    state = _state(control, failed, passed, skipped, not_run)
    return ControlResult(
        control=control, state=state, passed=passed, total=len(found), failed=failed,
        skipped=skipped, not_run=not_run,
        reports=tuple(_report_file(project_dir, path) for path in control.reports),
        documents=tuple(_document_state(root, path) for path in control.documents),
    )


def _state(control: Control, failed: tuple[str, ...], passed: int, skipped: int,
           not_run: tuple[str, ...]) -> str:
    if not control.tests:
        return control.status
    if failed:
        return "failed"
    if passed == 0:
        return "skipped" if skipped else "not run"
    return "partly run" if not_run else "passed"


def _report_file(project_dir: Path, path: str) -> ReportFile:
    target = project_dir / path
    if not target.is_file():
        return ReportFile(path, None)
    modified = datetime.fromtimestamp(target.stat().st_mtime).isoformat(" ", "minutes")
    return ReportFile(path, modified)


def _document_state(root: Path, path: str) -> DocumentState:
    target = root / path
    if not target.is_file():
        return DocumentState(path, False, 0)
    if path not in DOCUMENTS:
        return DocumentState(path, True, 0)
    return DocumentState(path, True, len(OPEN_ITEM.findall(target.read_text(encoding="utf-8"))))


def results_table(results: Iterable[ControlResult]) -> Table:
    """The results as a table for the terminal: control, title, kind, evidence, latest result."""
    table = Table(title="ENISA controls (section 4) in osteo", show_lines=True)
    for column in ("control", "title", "kind", "evidence", "latest result"):
        table.add_column(column, overflow="fold")
    for result in results:
        control = result.control
        evidence = "\n".join([*control.tests, *control.reports, *control.documents]) or "—"
        table.add_row(control.id, control.title, control.kind, evidence, result.summary(),
                      style="red" if result.state == "failed" else None)
    return table


def results_document(results: Iterable[ControlResult], run: TestRun | None) -> dict[str, Any]:
    """The results as a JSON-ready document, for machines.

    Args:
        results: results of ``assess``.
        run: the test run they were read from, or None.

    Returns:
        ``{"junit": {...}, "controls": [...]}``, one entry per control.
    """
    junit = ({"path": str(run.path), "timestamp": run.timestamp, "cases": len(run.cases)}
             if run else None)
    return {"junit": junit, "controls": [_result_entry(result) for result in results]}


def _result_entry(result: ControlResult) -> dict[str, Any]:
    control = result.control
    return {
        "id": control.id, "title": control.title, "kind": control.kind,
        "status": control.status, "statement": control.statement, "gap": control.gap,
        "state": result.state,
        "tests": {"nodes": list(control.tests), "passed": result.passed, "total": result.total,
                  "failed": list(result.failed), "skipped": result.skipped,
                  "not_run": list(result.not_run)},
        "reports": [{"path": r.path, "exists": r.modified is not None, "modified": r.modified}
                    for r in result.reports],
        "documents": [{"path": d.path, "exists": d.exists, "open_items": d.open_items}
                      for d in result.documents],
    }


# ---------------------------------------------------------------- generated facts of docs/


@dataclass(frozen=True)
class Facts:
    """The repository's facts the documents show.

    Attributes:
        access: ``infra/access.yaml`` (stores and roles).
        fields: ``infra/fields.yaml``, or None when absent.
        params: ``params.yaml``.
        stages: the stages of ``dvc.yaml``.
        default_remote: the default DVC remote of ``.dvc/config``, or None.
        services: the services of ``infra/docker-compose.yml`` (empty when absent).
        controls: the evidence map.
    """

    access: dict[str, Any]
    fields: dict[str, Any] | None
    params: dict[str, Any]
    stages: dict[str, Any]
    default_remote: str | None
    services: dict[str, Any]
    controls: list[Control]


def load_facts(root: Path) -> Facts:
    """Read the facts of a repository.

    Args:
        root: the repository root.

    Returns:
        The facts.

    Raises:
        ControlsError: when a required file (access matrix, params, dvc.yaml, evidence map) is
            missing or not YAML.
    """
    fields_file = root / "infra" / "fields.yaml"
    compose_file = root / "infra" / "docker-compose.yml"
    return Facts(
        access=_yaml(root / "infra" / "access.yaml"),
        fields=_yaml(fields_file) if fields_file.is_file() else None,
        params=_yaml(root / "params.yaml"),
        stages=_yaml(root / "dvc.yaml").get("stages", {}),
        default_remote=_default_remote(root / ".dvc" / "config"),
        services=_yaml(compose_file).get("services", {}) if compose_file.is_file() else {},
        controls=load_controls(root / CONTROLS_FILE),
    )


def _yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ControlsError(f"cannot read {path} ({error})") from None
    return loaded if isinstance(loaded, dict) else {}


def _default_remote(path: Path) -> str | None:
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as error:
        raise ControlsError(f"cannot read {path} ({error})") from None
    return parser.get("core", "remote", fallback=None)


def _cell(value: Any) -> str:
    """Text for a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(headers: tuple[str, ...], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _stores_section(facts: Facts) -> str:
    rows = []
    for store, spec in facts.access["stores"].items():
        locked = spec.get("append_only") or {}
        protection = (f"append-only; Object Lock {locked.get('mode')}, "
                      f"{locked.get('retention_years')} years" if locked else "")
        rows.append((f"`{store}`", f"`{spec['bucket']}`", spec.get("holds", ""), protection))
    return _table(("store", "bucket", "holds", "protection"), rows)


def _roles_section(facts: Facts) -> str:
    stores = list(facts.access["stores"])
    rows = [(f"`{role}`", spec.get("description", ""),
             ", ".join(s for s in stores if s in spec.get("access", {})) or "—")
            for role, spec in facts.access["roles"].items()]
    return _table(("role", "description", "stores reached"), rows)


def _access_section(facts: Facts) -> str:
    return markdown_table(facts.access)


def _fields_section(facts: Facts) -> str:
    if facts.fields is None:
        return ("TO FILL: infra/fields.yaml is absent, so the fields each store may hold are "
                "not declared; list them here with the reason each one is needed.")
    rows = [(f"`{store}`", ", ".join(f"`{name}`" for name in group.get("fields", [])),
             group.get("why", ""))
            for store, groups in facts.fields.items() for group in groups]
    return _table(("store", "fields", "why they are needed"), rows)


def _retention_section(facts: Facts) -> str:
    declared = facts.params.get("retention")
    if isinstance(declared, dict) and declared:
        table = _table(("setting in params.yaml", "value"),
                       [(f"`retention.{key}`", _period(key, value))
                        for key, value in _flatten(declared)])
    else:
        table = ("params.yaml has no `retention` block: the periods below are the intended "
                 "ones (ENISA 4.19).\n\n" + _table(
                     ("store", "data", "retention period"),
                     [(f"`{store}`", data, f"{period} (TO CONFIRM)")
                      for store, data, period in INTENDED_RETENTION]))
    locked = [(f"`{store}`", spec["append_only"].get("retention_years"))
              for store, spec in facts.access["stores"].items() if spec.get("append_only")]
    if locked:
        table += "\n\nEnforced by the server (Object Lock, infra/access.yaml):\n\n" + _table(
            ("store", "years every record is kept"), locked)
    return table


def _period(key: str, value: Any) -> str:
    """A retention setting for people: days also in years when the key says days."""
    if key.endswith("days") and isinstance(value, int) and value >= 365:
        return f"{value} days ({value / 365:.3g} years)"
    return str(value)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        items += _flatten(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return items


def _flows_section(facts: Facts) -> str:
    rows = []
    for stage, spec in facts.stages.items():
        reads = ", ".join(f"`{dep}`" for dep in spec.get("deps", [])) or "—"
        writes = "; ".join(_destination(facts, output) for output in _outputs(spec)) or "—"
        params = ", ".join(f"`{p}`" if isinstance(p, str) else f"`{next(iter(p))}`"
                           for p in spec.get("params", [])) or "—"
        rows.append((f"`{stage}`", f"`{spec.get('cmd', '')}`", reads, writes, params))
    return _table(("stage", "command", "reads", "writes (where it is pushed)", "params"), rows)


def _outputs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    outputs = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            if isinstance(entry, dict):
                outputs += [(path, options or {}) for path, options in entry.items()]
            else:
                outputs.append((str(entry), {}))
    return outputs


def _destination(facts: Facts, output: tuple[str, dict[str, Any]]) -> str:
    path, options = output
    if options.get("push") is False or options.get("cache") is False:
        return f"`{path}` (local, not pushed)"
    remote = options.get("remote", facts.default_remote)
    store = facts.access["stores"].get(remote) if remote else None
    where = f"{remote} store, `{store['bucket']}`" if store else f"DVC remote {remote}"
    return f"`{path}` → {where}"


def _services_section(facts: Facts) -> str:
    if not facts.services:
        return "TO FILL: infra/docker-compose.yml is absent; list the services that run osteo."
    rows = []
    for name, spec in facts.services.items():
        ports = ", ".join(str(port) for port in spec.get("ports", [])) or "none"
        volumes = ", ".join(str(volume).split(":")[0] for volume in spec.get("volumes", []))
        rows.append((f"`{name}`", f"`{spec.get('image', '')}`", ports, volumes or "none"))
    return _table(("service", "image", "published ports", "mounted data"), rows)


def _controls_section(facts: Facts) -> str:
    rows = [(c.id, c.title, c.kind, c.status, c.statement) for c in facts.controls]
    return _table(("control", "title", "kind", "status", "how osteo implements it"), rows)


def _gaps_section(facts: Facts) -> str:
    rows = [(c.id, c.title, c.status, c.gap) for c in facts.controls
            if c.gap and c.status in ("partial", "not implemented")]
    return _table(("control", "title", "status", "what is missing, and its consequence"), rows)


def _controller_section(facts: Facts) -> str:
    card = facts.params.get("model_card") or {}
    rows = [(f"`model_card.{key}`", value) for key, value in card.items()]
    return _table(("setting in params.yaml", "value shown on every model card"), rows)


def _readers_section(facts: Facts) -> str:
    readers = (facts.params.get("readers") or {}).get("accredited") or []
    return _table(("accredited reader id (params.yaml `readers.accredited`)",),
                  [(f"`{reader}`",) for reader in readers])


SECTIONS: dict[str, Callable[[Facts], str]] = {
    "stores": _stores_section,
    "roles": _roles_section,
    "access": _access_section,
    "fields": _fields_section,
    "retention": _retention_section,
    "flows": _flows_section,
    "services": _services_section,
    "controls": _controls_section,
    "gaps": _gaps_section,
    "controller": _controller_section,
    "readers": _readers_section,
}


def render_document(text: str, facts: Facts, source: str) -> str:
    """Fill every generated section of a document with the current facts.

    Args:
        text: the document's Markdown.
        facts: the repository's facts.
        source: the document's name, for messages.

    Returns:
        The document with each section between its markers regenerated; the rest untouched.

    Raises:
        ControlsError: when a marker names an unknown section or is not closed.
    """
    if text.count("<!-- generated:") != len(SECTION.findall(text)):
        raise ControlsError(f"{source}: a '<!-- generated:NAME -->' marker is not closed")
    return SECTION.sub(lambda match: _filled(match["name"], facts, source), text)


def _filled(name: str, facts: Facts, source: str) -> str:
    """One generated section with its markers."""
    if name not in SECTIONS:
        known = ", ".join(SECTIONS)
        raise ControlsError(f"{source}: unknown generated section '{name}' (known: {known})")
    return f"<!-- generated:{name} -->\n{SECTIONS[name](facts)}\n<!-- /generated -->"


def check_documents(root: Path) -> list[str]:
    """Find the generated sections that no longer match the repository.

    Args:
        root: the repository root.

    Returns:
        One message per missing document or drifted section, naming both; empty when every
        document is up to date.

    Raises:
        ControlsError: when the facts cannot be read or a marker is broken.
    """
    facts = load_facts(root)
    problems = []
    for name in DOCUMENTS:
        path = root / name
        if not path.is_file():
            problems.append(f"{name} does not exist")
            continue
        text = path.read_text(encoding="utf-8")
        fresh = SECTION.finditer(render_document(text, facts, name))
        problems += [f"{name}: section '{now['name']}' differs from the repository"
                     for now, then in zip(SECTION.finditer(text), fresh, strict=True)
                     if now["body"] != then["body"]]
    return problems


def write_documents(root: Path) -> list[str]:
    """Regenerate the generated sections of every document.

    Args:
        root: the repository root.

    Returns:
        The documents that changed, relative to the root.

    Raises:
        ControlsError: when the facts cannot be read, a document is missing or a marker is
            broken.
    """
    facts = load_facts(root)
    changed = []
    for name in DOCUMENTS:
        path = root / name
        if not path.is_file():
            raise ControlsError(f"{name} does not exist")
        text = path.read_text(encoding="utf-8")
        rendered = render_document(text, facts, name)
        if rendered != text:
            path.write_text(rendered, encoding="utf-8")
            changed.append(name)
    logger.info("regenerated %d of %d documents", len(changed), len(DOCUMENTS))
    return changed
