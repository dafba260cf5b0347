"""Model card: the plain-language documentation of one trained model version.

Control 4.2, document the diagnostic system: every registered version carries a Markdown card
saying what the model is for and not for, what data it learned from, how well it does overall
and for women and men (control 4.29), whether it met the accuracy criteria (control 4.25),
what it cannot be trusted for, and the hashes that trace it back to its data, code, parameters
and weights.

The card is filled from the evaluation's metrics document (``reports/metrics.json``), the
parameters and the lineage; the Markdown skeleton is ``osteo/templates/model_card.md``. The
inputs are aggregates only, and the rendered text is checked for anything shaped like a
pseudonymous image or patient id before it is returned.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATE = "templates/model_card.md"
PLACEHOLDER = "[to be completed by the practice]"
# Pseudonymous ids of osteo ("I" or "P" followed by 16 hex digits) must never reach a card.
IDENTIFIER = re.compile(r"\b[IP][0-9a-fA-F]{16}\b")
# Below this many osteoporosis cases in the test split, the recall interval spans over ten points.
SMALL_TEST_CASES = 100
TEST_ROWS = (("auc", "ROC AUC"), ("recall", "Recall (sensitivity)"),
             ("specificity", "Specificity"), ("precision", "Precision (PPV)"),
             ("f1", "F1"), ("accuracy", "Accuracy"))


class ModelCardError(ValueError):
    """The card would disclose something it must not (an identifier)."""


@dataclass(frozen=True)
class Lineage:
    """What a model version was made from.

    Attributes:
        version: registry version id.
        created_at: registration time, ISO 8601 UTC.
        data_version: DVC hash of the split dataset.
        code_version: git commit of the project, ``unknown`` outside git.
        params_sha256: sha256 of the parameters used.
        checkpoint_sha256: sha256 of the checkpoint file.
        export_manifest_sha256: sha256 of the export's file manifest, when available.
    """

    version: str
    created_at: str
    data_version: str
    code_version: str
    params_sha256: str
    checkpoint_sha256: str
    export_manifest_sha256: str | None = None


def render_model_card(metrics: dict[str, Any], params: dict[str, Any], lineage: Lineage) -> str:
    """Fill the model card of one version.

    Args:
        metrics: the evaluation's metrics document (``reports/metrics.json``).
        params: the parameters the version was trained and evaluated with.
        lineage: versions and hashes of the inputs.

    Returns:
        The card as Markdown.

    Raises:
        ModelCardError: when the rendered card contains an image or patient identifier.
    """
    fields = (
        _header_fields(metrics, lineage)
        | _data_fields(metrics, params, lineage)
        | _performance_fields(metrics)
        | _acceptance_fields(metrics)
        | _contact_fields(params)
    )
    fields["limitations"] = _bullets(limitations(metrics))
    template = resources.files("osteo").joinpath(TEMPLATE).read_text(encoding="utf-8")
    card = template.format_map(fields)
    if IDENTIFIER.search(card):
        raise ModelCardError("the model card contains an image or patient identifier; "
                             "it was not written")
    return card


def write_model_card(
    path: Path, metrics: dict[str, Any], params: dict[str, Any], lineage: Lineage
) -> str:
    """Render the card and write it to ``path``.

    Returns:
        The card as Markdown.

    Raises:
        ModelCardError: when the rendered card contains an identifier (nothing is written).
    """
    card = render_model_card(metrics, params, lineage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card, encoding="utf-8")
    logger.info("model card of version %s written to %s", lineage.version, path)
    return card


def limitations(metrics: dict[str, Any]) -> list[str]:
    """The known limitations of a version, in plain words, from its metrics document."""
    test, ci = metrics["test"], metrics["ci95"]
    items = [_data_limitation(metrics["synthetic"])]
    size = "Small test split" if test["n_positive"] < SMALL_TEST_CASES else "Test split"
    items.append(
        f"{size}: {test['n_images']} images of {test['n_patients']} patients, "
        f"{test['n_positive']} with osteoporosis. The 95% intervals show the uncertainty (AUC "
        f"{_interval(ci['auc'])}, recall {_interval(ci['recall'])}); differences smaller than "
        "these intervals are not evidence of a better or worse model."
    )
    items += [
        "Labels are readers' judgements on the radiograph, not DXA T-scores: readers' errors "
        "are learned by the model and counted as truth when it is measured.",
        "Bias is assessed between women and men only (sex as recorded, F or M). Age groups, "
        "BMI, scanners and other groups are not assessed.",
        f"The threshold was chosen on a validation split of {metrics['val']['n_images']} "
        "images; the test intervals hold it fixed and do not include the uncertainty of "
        "choosing it.",
        "Acceptance uses the point estimates of the test split, not the lower ends of their "
        "intervals.",
        "The probabilities are not checked for calibration: read them as a ranking score, "
        "not as a patient's risk.",
    ]
    items += [note[:1].upper() + note[1:] + "." for note in metrics.get("notes", [])]
    return items


# ---------------------------------------------------------------- sections


def _header_fields(metrics: dict[str, Any], lineage: Lineage) -> dict[str, str]:
    accepted = metrics["acceptance"]["accepted"]
    return {
        "version": lineage.version,
        "created_at": lineage.created_at,
        "decision": "ACCEPTED" if accepted else "REJECTED",
        "data_version": lineage.data_version,
        "code_version": lineage.code_version,
        "params_sha256": lineage.params_sha256,
        "checkpoint_sha256": lineage.checkpoint_sha256,
        "export_manifest": lineage.export_manifest_sha256 or "not available",
    }


def _data_fields(
    metrics: dict[str, Any], params: dict[str, Any], lineage: Lineage
) -> dict[str, str]:
    readers = (params.get("readers") or {}).get("accredited") or []
    min_readers = (params.get("ingest") or {}).get("min_readers", 1)
    size = (params.get("preprocess") or {}).get("size")
    return {
        "data_source": _data_source(metrics, params),
        "labels": (
            f"consensus of the practice's accredited readers ({len(readers)} accredited, "
            f"`readers.accredited`), at least {min_readers} accredited reading(s) per image; "
            "annotations by other readers are discarded (control 4.28)."
        ),
        "split_table": _split_table(metrics["dataset"]),
        "image_size": f"{size}x{size} pixels" if size else "size of `preprocess.size`",
        "train_params": _train_params(params),
    }


def _confidence_rule(metrics: dict[str, Any]) -> str:
    """How sure the threshold's recall is, when the threshold was chosen with a confidence."""
    confidence = metrics.get("threshold_confidence")
    if confidence is None:
        return ""
    reached = metrics["val"].get("recall_confidence")
    return (f" with a probability of at least {_fmt(confidence, 2)} that the true recall "
            f"does, given the few validation cases (`evaluate.threshold_confidence`; "
            f"reached: {_fmt(reached, 2)})")


def _performance_fields(metrics: dict[str, Any]) -> dict[str, str]:
    test, val, confusion = metrics["test"], metrics["val"], metrics["confusion"]
    return {
        "threshold": _fmt(metrics["threshold"]),
        "target_recall": _fmt(metrics["target_recall"], 2),
        "confidence_rule": _confidence_rule(metrics),
        "val_images": str(val["n_images"]),
        "val_recall": _fmt(val["recall"]),
        "val_specificity": _fmt(val["specificity"]),
        "test_images": str(test["n_images"]),
        "test_patients": str(test["n_patients"]),
        "test_positive": str(test["n_positive"]),
        "resamples": str(metrics["bootstrap"]["resamples"]),
        "seed": str(metrics["bootstrap"]["seed"]),
        "test_table": _test_table(metrics),
        "sex_table": _sex_table(metrics),
        "sex_difference": _sex_difference(metrics),
        "oracle": _oracle(metrics),
        **{name: str(confusion[name]) for name in ("tp", "fn", "fp", "tn")},
    }


def _acceptance_fields(metrics: dict[str, Any]) -> dict[str, str]:
    acceptance = metrics["acceptance"]
    rows = ["| Criterion | Metric | Limit | Value | Result |", "|---|---|---:|---:|---|"]
    for check in acceptance["checks"]:
        bound = "at most" if check["criterion"].startswith("max") else "at least"
        rows.append(f"| `criteria.{check['criterion']}` | {check['metric']} | {bound} "
                    f"{_fmt(check['limit'])} | {_fmt(check['value'])} | "
                    f"{'met' if check['passed'] else '**not met**'} |")
    if acceptance["accepted"]:
        text = ("**Accepted**: every criterion is met. The version may be promoted to "
                "champion in the model registry.")
    else:
        text = ("**Rejected**: the version is kept in the registry for the record but cannot "
                "be promoted to champion. Reasons:\n\n" + _bullets(acceptance["reasons"]))
    return {"criteria_table": "\n".join(rows), "decision_text": text}


def _contact_fields(params: dict[str, Any]) -> dict[str, str]:
    block = params.get("model_card") or {}
    return {
        "data_controller": str(block.get("data_controller") or PLACEHOLDER),
        "contact": str(block.get("contact") or PLACEHOLDER),
    }


# ---------------------------------------------------------------- pieces


def _data_source(metrics: dict[str, Any], params: dict[str, Any]) -> str:
    if metrics["synthetic"]:
        patients = (params.get("generate") or {}).get("patients")
        clinic = f" of {patients} simulated patients" if patients else ""
        return (f"**The data are SIMULATED.** They come from osteo's phantom generator (a "
                f"synthetic clinic{clinic}, `generate` parameters), not from real patients.")
    return "Retrospective radiographs and reader annotations exported by the practice."


def _data_limitation(synthetic: bool) -> str:
    if synthetic:
        return ("The demo data is SIMULATED by a phantom generator. These figures say "
                "nothing about real clinical performance; the model must be trained and "
                "validated on the practice's own radiographs before any clinical use.")
    return ("The figures come from one retrospective export of one practice; performance "
            "on other scanners, sites or populations is unknown until measured there.")


def _split_table(dataset: dict[str, dict[str, Any]]) -> str:
    rows = ["| Split | Images | Patients | Osteoporosis prevalence | Women |",
            "|---|---:|---:|---:|---:|"]
    for split, counts in dataset.items():
        rows.append(f"| {split} | {_count(counts['n_images'])} | "
                    f"{_count(counts['n_patients'])} | {_percent(counts['prevalence'])} | "
                    f"{_percent(counts['female_share'])} |")
    return "\n".join(rows)


def _train_params(params: dict[str, Any]) -> str:
    block = params.get("train") or {}
    if not block:
        return ""
    listed = ", ".join(f"`{key}` = {value}" for key, value in block.items())
    return f"- Training parameters (`train`): {listed}."


def _test_table(metrics: dict[str, Any]) -> str:
    rows = ["| Metric | Value | 95% CI |", "|---|---:|---|"]
    for key, name in TEST_ROWS:
        rows.append(f"| {name} | {_fmt(metrics['test'][key])} | "
                    f"{_interval(metrics['ci95'][key])} |")
    return "\n".join(rows)


def _sex_table(metrics: dict[str, Any]) -> str:
    by_sex, gap, ci = metrics["by_sex"], metrics["sex_gap"], metrics["ci95"]
    rows = ["| Group | Images | Osteoporosis | Recall (95% CI) | Precision | Flagged | "
            "AUC (95% CI) |", "|---|---:|---:|---|---:|---:|---|"]
    for sex, values in by_sex.items():
        rows.append(
            f"| {_SEX_NAMES.get(sex, sex)} | {values['n_images']} | {values['n_positive']} | "
            f"{_fmt(values['recall'])} ({_interval(ci.get(f'recall_{sex}'))}) | "
            f"{_fmt(values['precision'])} | {_percent(values['selection_rate'])} | "
            f"{_fmt(values['auc'])} ({_interval(ci.get(f'auc_{sex}'))}) |"
        )
    rows.append(f"| Gap (max - min) | | | {_fmt(gap['recall'])} | {_fmt(gap['precision'])} | "
                f"{_percent(gap['selection_rate'])} | {_fmt(gap['auc'])} |")
    return "\n".join(rows)


def _sex_difference(metrics: dict[str, Any]) -> str:
    interval = _interval(metrics["ci95"].get("recall_F_minus_M"))
    return ("Recall of women minus recall of men, 95% CI: "
            f"{interval}. An interval that contains 0 gives no evidence that one sex is "
            "served better than the other; a wide one means the test split is too small "
            "to tell.")


def _oracle(metrics: dict[str, Any]) -> str:
    oracle = metrics["oracle"]
    if not metrics["synthetic"] or oracle["auc"] is None:
        return ""
    return (
        "## Reference: the simulated T-score (synthetic data only)\n\n"
        f"On the {oracle['n_images']} test images, ranking by the simulated T-score itself "
        f"gives an AUC of {_fmt(oracle['auc'])} against the readers' labels; the model reaches "
        f"{_fmt(oracle['model_auc'])} (model - oracle: {_signed(oracle['auc_gap'])}). The "
        f"readers' labels agree with the true label on {_percent(oracle['label_agreement'])} "
        "of these images."
    )


_SEX_NAMES = {"F": "Women (F)", "M": "Men (M)"}


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _interval(interval: dict[str, float | None] | None) -> str:
    if not interval or interval["low"] is None or interval["high"] is None:
        return "not reported"
    return f"{interval['low']:.3f} to {interval['high']:.3f}"
