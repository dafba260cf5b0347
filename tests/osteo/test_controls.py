"""The evidence map of the ENISA controls, their latest results and the generated documents.

Runs without any server: the map and the documents are checked against the repository, test
results come from small JUnit files shaped like pytest's, and from one real pytest run on a
throwaway test file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
import yaml
from typer.testing import CliRunner

from osteo import controls as evidence
from osteo.cli import app
from osteo.config import PACKAGE_ROOT

MAP = PACKAGE_ROOT / evidence.CONTROLS_FILE
FACT_FILES = ("infra/access.yaml", "infra/fields.yaml", "infra/docker-compose.yml",
              "params.yaml", "dvc.yaml", ".dvc/config")


def write_junit(path: Path, cases: list[tuple[str, str, str]]) -> Path:
    """A JUnit report shaped like pytest's: (classname, name, outcome) per test case."""
    children = {"passed": "", "failed": '<failure message="assert 0">trace</failure>',
                "error": '<error message="collection failure">trace</error>',
                "skipped": '<skipped type="pytest.skip" message="skipped" />'}
    body = "".join(
        f"<testcase classname={quoteattr(classname)} name={quoteattr(name)} time=\"0.1\">"
        f"{children[outcome]}</testcase>" for classname, name, outcome in cases
    )
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" timestamp="2025-03-01T10:15:00+00:00">{body}</testsuite>'
        "</testsuites>"
    )
    return path


def control(tests: tuple[str, ...], **changes: object) -> evidence.Control:
    """A technical control with the given tests."""
    fields: dict[str, object] = {
        "id": "4.9", "title": "Control all data used by the ML model", "kind": "technical",
        "status": "implemented", "statement": "checked", "tests": tests,
    }
    fields.update(changes)
    return evidence.Control(**fields)  # type: ignore[arg-type]


def result_of(tests: tuple[str, ...], cases: list[tuple[str, str, str]],
              tmp_path: Path) -> evidence.ControlResult:
    run = evidence.read_junit(write_junit(tmp_path / "junit.xml", cases))
    return evidence.assess([control(tests)], run, tmp_path, PACKAGE_ROOT)[0]


# ---------------------------------------------------------------- the evidence map


def test_every_control_of_section_4_appears_exactly_once() -> None:
    ids = [c.id for c in evidence.load_controls(MAP)]

    assert sorted(ids, key=lambda cid: int(cid.split(".")[1])) == list(evidence.CONTROL_IDS)
    assert len(ids) == len(set(ids)) == 29


def test_every_named_test_file_test_and_document_exists() -> None:
    assert evidence.check_map(evidence.load_controls(MAP), PACKAGE_ROOT) == []


def test_controls_not_implemented_name_no_evidence_and_say_the_consequence() -> None:
    missing = [c for c in evidence.load_controls(MAP) if c.status == "not implemented"]

    assert {"4.4", "4.5", "4.6", "4.13", "4.26", "4.27"} <= {c.id for c in missing}
    assert all(c.gap and not c.tests for c in missing)


def test_technical_control_without_tests_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "controls.yaml"
    path.write_text(yaml.safe_dump({"controls": [{
        "id": "4.8", "title": "Secure the transit", "kind": "technical",
        "status": "implemented", "statement": "TLS"}]}))

    with pytest.raises(evidence.ControlsError, match=r"control 4\.8: .*needs 'tests'"):
        evidence.load_controls(path)


def test_partial_control_without_its_gap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "controls.yaml"
    path.write_text(yaml.safe_dump({"controls": [{
        "id": "4.12", "title": "Monitor", "kind": "technical", "status": "partial",
        "statement": "evaluated", "tests": ["tests/tasks/test_evaluate.py"]}]}))

    with pytest.raises(evidence.ControlsError, match="needs its 'gap'"):
        evidence.load_controls(path)


def test_missing_control_duplicate_and_absent_test_are_reported(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("class TestA:\n    def test_m(self):\n"
                                                  "        pass\n\ndef test_f():\n    pass\n")
    present = control(("tests/test_x.py::test_f", "tests/test_x.py::TestA::test_m"))
    absent = control(("tests/test_x.py::test_gone", "tests/test_y.py"), id="4.9")

    problems = evidence.check_map([present, absent], tmp_path)

    assert "control 4.1 is missing" in problems
    assert "control 4.9 appears 2 times" in problems
    assert "control 4.9: tests/test_x.py::test_gone: no such test in tests/test_x.py" in problems
    assert "control 4.9: test file tests/test_y.py does not exist" in problems
    assert not [p for p in problems if "test_x.py::test_f" in p or "TestA" in p]


# ---------------------------------------------------------------- latest results


def test_failure_in_the_report_marks_the_control_failed_naming_the_test(tmp_path: Path) -> None:
    result = result_of(("tests/osteo/test_tls.py",), [
        ("tests.osteo.test_tls", "test_private_keys_are_owner_only", "failed"),
        ("tests.osteo.test_tls", "test_client_without_the_ca_fails_verification", "passed"),
    ], tmp_path)

    assert result.state == "failed" and result.evidence_failed
    assert result.failed == ("test_private_keys_are_owner_only",)
    assert result.summary().startswith("FAILED 1/2: test_private_keys_are_owner_only")


def test_control_whose_tests_are_not_in_the_report_is_not_run(tmp_path: Path) -> None:
    result = result_of(("tests/osteo/test_vault.py",), [
        ("tests.osteo.test_tls", "test_private_keys_are_owner_only", "passed"),
    ], tmp_path)

    assert result.state == "not run" and result.evidence_failed
    assert result.summary() == "not run"


def test_without_a_report_every_technical_control_is_not_run(tmp_path: Path) -> None:
    run = evidence.read_junit(tmp_path / "absent.xml")
    results = evidence.assess(evidence.load_controls(MAP), run, tmp_path, PACKAGE_ROOT)

    assert run is None
    assert {r.state for r in results if r.control.tests} == {"not run"}
    assert {r.state for r in results if r.control.status == "not implemented"} == {
        "not implemented"}


def test_parametrised_and_class_tests_belong_to_their_node(tmp_path: Path) -> None:
    result = result_of(
        ("tests/osteo/test_a.py::test_cell", "tests/osteo/test_a.py::TestK::test_m"), [
            ("tests.osteo.test_a", "test_cell[admin-read]", "passed"),
            ("tests.osteo.test_a", "test_cell[admin-write]", "passed"),
            ("tests.osteo.test_a", "test_cell_other", "failed"),
            ("tests.osteo.test_a.TestK", "test_m", "passed"),
        ], tmp_path)

    assert (result.state, result.passed, result.total) == ("passed", 3, 3)


def test_collection_error_of_a_file_fails_the_tests_it_names(tmp_path: Path) -> None:
    result = result_of(("tests/osteo/test_a.py::test_cell",), [
        ("", "tests.osteo.test_a", "error"),
    ], tmp_path)

    assert result.state == "failed"
    assert result.failed == ("tests.osteo.test_a",)


def test_entry_left_out_of_the_run_makes_the_control_partly_run(tmp_path: Path) -> None:
    result = result_of(("tests/osteo/test_a.py", "tests/e2e/test_b.py"), [
        ("tests.osteo.test_a", "test_one", "passed"),
        ("tests.osteo.test_a", "test_two", "skipped"),
    ], tmp_path)

    assert result.state == "partly run" and result.evidence_failed
    assert result.summary() == "passed 1/2, skipped 1; not run: tests/e2e/test_b.py"


def test_only_skipped_tests_prove_nothing(tmp_path: Path) -> None:
    result = result_of(("tests/osteo/test_a.py",), [
        ("tests.osteo.test_a", "test_one", "skipped"),
    ], tmp_path)

    assert result.state == "skipped" and result.evidence_failed


def test_file_that_is_not_junit_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text("passed: 3")

    with pytest.raises(evidence.ControlsError, match="junit.xml is not a JUnit XML report"):
        evidence.read_junit(path)


def test_real_pytest_run_gives_each_control_its_result(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_probe.py").write_text(
        "def test_holds():\n    assert 1 + 1 == 2\n\n\ndef test_breaks():\n    assert 1 + 1 == 3\n"
    )
    holding = control(("tests/test_probe.py::test_holds",), id="4.15")
    whole = control(("tests/test_probe.py",), id="4.9")
    junit = tmp_path / "reports" / "tests" / "junit.xml"

    code = evidence.run_evidence_tests([holding, whole], junit, tmp_path)
    results = evidence.assess([holding, whole], evidence.read_junit(junit), tmp_path, tmp_path)

    assert code == 1
    assert [(r.state, r.passed, r.total) for r in results] == [("passed", 1, 1),
                                                               ("failed", 1, 2)]
    assert results[1].failed == ("test_breaks",)


def test_report_of_an_earlier_run_never_passes_for_a_run_that_wrote_none(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text("raise RuntimeError('broken conftest')\n")
    (tmp_path / "tests" / "test_probe.py").write_text("def test_holds():\n    pass\n")
    junit = write_junit(tmp_path / "junit.xml", [("tests.test_probe", "test_holds", "passed")])
    probe = control(("tests/test_probe.py",))

    code = evidence.run_evidence_tests([probe], junit, tmp_path)
    result = evidence.assess([probe], evidence.read_junit(junit), tmp_path, tmp_path)[0]

    assert code != 0
    assert result.state == "not run"


def test_tests_inside_a_file_named_whole_run_once() -> None:
    nodes = evidence.evidence_nodes([control(("tests/a.py", "tests/a.py::test_x",
                                              "tests/b.py::test_y"))])

    assert nodes == ["tests/a.py", "tests/b.py::test_y"]


def test_reports_show_whether_a_run_wrote_them_and_when(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}")
    metrics = control(("tests/tasks/test_evaluate.py",),
                      reports=("reports/metrics.json", "reports/model_card.md"))

    result = evidence.assess([metrics], None, tmp_path, PACKAGE_ROOT)[0]

    assert result.reports[0].modified is not None
    assert result.reports[1].modified is None
    assert "reports/model_card.md missing" in result.summary()


def test_documents_count_what_is_left_to_fill(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lia.md").write_text(
        "Complete every `TO FILL:` and `TO CONFIRM`.\nTO FILL: a\nTO CONFIRM b\nfilled\n")
    lia = evidence.Control("4.21", "Formalize a LIA", "organisational", "to complete", "LIA",
                           documents=("docs/lia.md",))

    result = evidence.assess([lia], None, tmp_path, tmp_path)[0]

    assert result.documents[0].open_items == 2
    assert result.summary() == "to complete\ndocs/lia.md: 2 items to fill or confirm"


# ---------------------------------------------------------------- generated documents


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    """A copy of the repository's facts and documents."""
    for name in FACT_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE_ROOT / name, tmp_path / name)
    shutil.copytree(PACKAGE_ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_generated_sections_of_the_documents_are_up_to_date() -> None:
    assert evidence.check_documents(PACKAGE_ROOT) == []


def test_renamed_bucket_is_found_in_every_document_showing_it(repository: Path) -> None:
    access = repository / "infra" / "access.yaml"
    access.write_text(access.read_text().replace("bucket: osteo-training",
                                                 "bucket: practice-training"))

    drifted = evidence.check_documents(repository)
    changed = evidence.write_documents(repository)

    assert "docs/dpia.md: section 'stores' differs from the repository" in drifted
    assert "docs/dpia.md: section 'flows' differs from the repository" in drifted
    assert "docs/processors.md: section 'stores' differs from the repository" in drifted
    assert "docs/dpia.md" in changed and evidence.check_documents(repository) == []
    assert "`practice-training`" in (repository / "docs" / "dpia.md").read_text()


def test_text_outside_the_generated_sections_is_kept(repository: Path) -> None:
    dpia = repository / "docs" / "dpia.md"
    dpia.write_text(dpia.read_text().replace("TO FILL: radiologists,", "Dr A, Dr B,"))
    params = repository / "params.yaml"
    params.write_text(params.read_text().replace("RAD03]", "RAD04]"))

    evidence.write_documents(repository)

    assert "Dr A, Dr B," in dpia.read_text()
    assert "`RAD04`" in (repository / "docs" / "data-controller.md").read_text()


def set_retention(repository: Path, retention: dict[str, int] | None) -> str:
    """Replace the retention block of params.yaml, regenerate, return the retention policy."""
    params = repository / "params.yaml"
    loaded = yaml.safe_load(params.read_text())
    loaded.pop("retention", None)
    if retention is not None:
        loaded["retention"] = retention
    params.write_text(yaml.safe_dump(loaded))
    evidence.write_documents(repository)
    return (repository / "docs" / "retention-policy.md").read_text()


def test_retention_periods_come_from_the_params_block(repository: Path) -> None:
    text = set_retention(repository, {"training_days": 730, "patient_files_days": 7300})

    assert "| `retention.training_days` | 730 days (2 years) |" in text
    assert "| `retention.patient_files_days` | 7300 days (20 years) |" in text
    assert "no `retention` block" not in text


def test_without_a_retention_block_the_intended_periods_are_to_confirm(repository: Path) -> None:
    text = set_retention(repository, None)

    assert "params.yaml has no `retention` block" in text
    assert ("| `patient_files` | identifiable patient files (legal disputes) "
            "| 20 years (TO CONFIRM) |") in text


def test_unknown_generated_section_is_refused_naming_the_document(repository: Path) -> None:
    lia = repository / "docs" / "lia.md"
    lia.write_text(lia.read_text() + "\n<!-- generated:budget -->\n<!-- /generated -->\n")

    with pytest.raises(evidence.ControlsError, match="docs/lia.md: unknown generated section"):
        evidence.check_documents(repository)


# ---------------------------------------------------------------- command line


def test_controls_help_lists_its_options() -> None:
    result = CliRunner().invoke(app, ["controls", "--help"])

    assert result.exit_code == 0
    for option in ("--run", "--junit", "--format", "--strict", "docs"):
        assert option in result.output


def test_command_reads_a_junit_file_and_reports_failed_and_not_run(tmp_path: Path) -> None:
    junit = write_junit(tmp_path / "junit.xml", [
        ("tests.osteo.test_tls", "test_private_keys_are_owner_only", "failed"),
        ("tests.osteo.test_tls", "test_client_without_the_ca_fails_verification", "passed"),
    ])

    result = CliRunner().invoke(app, ["controls", "--junit", str(junit), "--format", "json",
                                      "--project-dir", str(tmp_path)])
    document = json.loads(result.stdout)
    states = {entry["id"]: entry for entry in document["controls"]}

    assert result.exit_code == 0
    assert document["junit"]["cases"] == 2
    assert states["4.8"]["state"] == "failed"
    assert states["4.8"]["tests"]["failed"] == ["test_private_keys_are_owner_only"]
    assert states["4.15"]["state"] == "not run"
    assert states["4.4"]["state"] == "not implemented"


def test_strict_command_exits_1_when_evidence_failed_or_did_not_run(tmp_path: Path) -> None:
    junit = write_junit(tmp_path / "junit.xml", [
        ("tests.osteo.test_tls", "test_private_keys_are_owner_only", "passed"),
    ])

    shown = CliRunner().invoke(app, ["controls", "--junit", str(junit)])
    strict = CliRunner().invoke(app, ["controls", "--junit", str(junit), "--strict"])

    assert shown.exit_code == 0 and "4.15" in shown.stdout and "not run" in shown.stdout
    assert strict.exit_code == 1


def test_docs_check_command_passes_on_the_repository() -> None:
    result = CliRunner().invoke(app, ["controls", "docs", "--check"])

    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout
