"""Tests of the split stage: patient grouping, stratification, determinism and refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.shards import ShardWriter
from tasks.split import SplitError, fold_plan, split

PARAMS = {"split": {"seed": 7, "fractions": [0.8, 0.1, 0.1], "tolerance": 0.05}}


def _prepared_records(patients: int, seed: int = 0, prevalence: float = 0.3) -> pd.DataFrame:
    """Synthetic prepared records: 1 to 3 images per patient, labels mostly shared by patient."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for patient in range(patients):
        sex = "F" if rng.random() < 0.6 else "M"
        osteoporotic = rng.random() < prevalence
        for _ in range(rng.integers(1, 4)):
            label = osteoporotic if rng.random() > 0.1 else not osteoporotic
            image_id = f"I{rng.integers(1 << 62):016x}"
            rows.append({
                "image_id": image_id, "patient_id": f"P{patient:016x}",
                "age": int(rng.integers(40, 90)), "sex": sex, "bmi": 25.0,
                "label": "osteoporosis" if label else "normal", "shard": "shard-00000.npz",
                "member": f"{len(rows):06d}",
                "content_key": hashlib.sha256(_pixels(image_id).tobytes()).hexdigest(),
            })
    return pd.DataFrame(rows)


def _project(root: Path, records: pd.DataFrame) -> Layout:
    """A project holding the records and a shard with a small, distinct image for each."""
    layout = Layout(root)
    layout.prepared_pixel_dir.mkdir(parents=True)
    records.to_parquet(layout.prepared_records, index=False)
    _write_shard(layout, _stored(records))
    return layout


def _stored(records: pd.DataFrame) -> dict[str, np.ndarray]:
    """The records' images by member name, as the shard holds them."""
    return {member: _pixels(image_id)
            for image_id, member in zip(records["image_id"], records["member"], strict=True)}


def _write_shard(layout: Layout, images: dict[str, np.ndarray]) -> None:
    """Write the images as the one shard the synthetic records name (shard-00000.npz)."""
    with ShardWriter(layout.prepared_pixel_dir, shard_size=len(images) + 1) as writer:
        for member, pixels in images.items():
            writer.add(member, pixels)


def _pixels(image_id: str) -> np.ndarray:
    """Pixels that depend on the image only (seeded by its id in these synthetic records)."""
    return np.random.default_rng(int(image_id[1:], 16)).random((4, 4)).astype(np.float16)


def _params(**overrides: object) -> dict[str, dict[str, object]]:
    return {"split": {**PARAMS["split"], **overrides}}


def test_no_patient_appears_in_two_splits(tmp_path: Path) -> None:
    layout = _project(tmp_path, _prepared_records(300))

    split.fn(layout, PARAMS)

    table = pd.read_parquet(layout.split_table)
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert (table.groupby("patient_id").size() > 1).any()  # the grouping was actually needed


def test_every_split_keeps_osteoporosis_and_sex_ratios(tmp_path: Path) -> None:
    records = _prepared_records(300)
    layout = _project(tmp_path, records)

    summary = split.fn(layout, PARAMS)

    table = pd.read_parquet(layout.split_table).merge(records, on=["image_id", "patient_id"])
    whole_positive = (records["label"] == "osteoporosis").mean()
    whole_female = (records["sex"] == "F").mean()
    for name, members in table.groupby("split"):
        assert abs((members["label"] == "osteoporosis").mean() - whole_positive) <= 0.05, name
        assert abs((members["sex"] == "F").mean() - whole_female) <= 0.05, name
        assert summary.extra[name]["images"] == len(members)
    written = json.loads(layout.summary("split").read_text())
    assert written["records_in"] == written["accepted"] == len(records)
    assert written["extra"]["all"]["osteoporosis_ratio"] == pytest.approx(whole_positive, abs=1e-4)


def test_fractions_are_respected_approximately(tmp_path: Path) -> None:
    records = _prepared_records(300)
    layout = _project(tmp_path, records)

    split.fn(layout, PARAMS)

    shares = pd.read_parquet(layout.split_table)["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.03)
    assert shares["val"] == pytest.approx(0.1, abs=0.03)
    assert shares["test"] == pytest.approx(0.1, abs=0.03)


def test_same_seed_gives_the_same_split_whatever_the_row_order(tmp_path: Path) -> None:
    records = _prepared_records(200)
    first = _project(tmp_path / "a", records)
    shuffled = _project(tmp_path / "b", records.sample(frac=1.0, random_state=1))
    other_seed = _project(tmp_path / "c", records)

    split.fn(first, PARAMS)
    split.fn(shuffled, PARAMS)
    split.fn(other_seed, _params(seed=8))

    def by_image(layout: Layout) -> pd.Series:
        return pd.read_parquet(layout.split_table).set_index("image_id")["split"].sort_index()

    pd.testing.assert_series_equal(by_image(first), by_image(shuffled))
    assert not by_image(first).equals(by_image(other_seed))


def test_a_new_vault_gives_the_same_patients_the_same_splits(tmp_path: Path) -> None:
    """Pseudonyms are random per identity vault; the split follows the images' content."""
    records = _prepared_records(200).sort_values("image_id", ignore_index=True)
    rng = np.random.default_rng(5)
    renamed = {old: f"{old[0]}{rng.integers(1 << 62):016x}"
               for old in (*records["image_id"].unique(), *records["patient_id"].unique())}
    original = _project(tmp_path / "a", records)
    new_vault = Layout(tmp_path / "b")
    new_vault.prepared_pixel_dir.mkdir(parents=True)
    records.replace({"image_id": renamed, "patient_id": renamed}).sort_values(
        "image_id").to_parquet(new_vault.prepared_records, index=False)  # as preprocess writes
    _write_shard(new_vault, _stored(records))  # member names do not depend on the vault

    split.fn(original, PARAMS)
    split.fn(new_vault, PARAMS)

    first = pd.read_parquet(original.split_table)
    second = pd.read_parquet(new_vault.split_table)
    back = {new: old for old, new in renamed.items()}
    pd.testing.assert_frame_equal(first, second.replace({"image_id": back, "patient_id": back}))


def test_an_image_missing_from_its_shard_raises_split_error(tmp_path: Path) -> None:
    records = _prepared_records(60)
    layout = _project(tmp_path, records)
    _write_shard(layout, _stored(records.iloc[1:]))

    with pytest.raises(SplitError, match=f"lacks 1 prepared image.*{records['image_id'][0]}"):
        split.fn(layout, PARAMS)


def test_the_stage_command_prints_no_warning_outside_a_flow(tmp_path: Path) -> None:
    """`osteo stage split`, as `dvc repro` runs it: no flow run, so no Prefect API logging."""
    layout = _project(tmp_path / "project", _prepared_records(200))
    (tmp_path / "project" / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    inherited = {name: value for name, value in os.environ.items()
                 if name != "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"}

    run = subprocess.run(  # noqa: S603 - this environment's own osteo
        [str(Path(sys.executable).parent / "osteo"), "stage", "split"], cwd=layout.root,
        env=inherited | {"PREFECT_HOME": str(tmp_path / "prefect")}, capture_output=True,
        text=True, check=False, timeout=300)

    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("split: ") and "0 quarantined" in run.stdout
    assert "Warning" not in run.stderr, run.stderr


def test_zero_tolerance_on_an_uneven_set_raises_split_error(tmp_path: Path) -> None:
    layout = _project(tmp_path, _prepared_records(120))

    with pytest.raises(SplitError, match="beyond split.tolerance 0.0"):
        split.fn(layout, _params(tolerance=0.0))
    assert not layout.split_table.exists()


def test_too_few_osteoporosis_cases_raise_split_error(tmp_path: Path) -> None:
    # 50 patients with one image each, 4 of them osteoporotic (8 %): the validation and test
    # splits hold about 5 images, so they show either 0 % or at least 20 % osteoporosis.
    records = _prepared_records(200).drop_duplicates("patient_id").head(50)
    records["label"] = ["osteoporosis"] * 4 + ["normal"] * 46
    layout = _project(tmp_path, records)

    with pytest.raises(SplitError, match="osteoporosis ratio"):
        split.fn(layout, PARAMS)


def test_fewer_patients_than_folds_raise_split_error(tmp_path: Path) -> None:
    layout = _project(tmp_path, _prepared_records(5))

    with pytest.raises(SplitError, match="patients"):
        split.fn(layout, PARAMS)


def test_missing_prepared_records_raise_split_error(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="preprocess stage"):
        split.fn(Layout(tmp_path), PARAMS)


@pytest.mark.parametrize(
    ("fractions", "plan"),
    [([0.8, 0.1, 0.1], (8, 1, 1)), ([0.7, 0.15, 0.15], (14, 3, 3)), ([0.6, 0.2, 0.2], (3, 1, 1))],
)
def test_fractions_become_equal_folds(fractions: list[float], plan: tuple[int, ...]) -> None:
    assert fold_plan(fractions) == plan


@pytest.mark.parametrize(
    "fractions", [[0.8, 0.2], [0.5, 0.3, 0.3], [0.8, 0.2, 0.0], [0.81, 0.09, 0.1], None],
)
def test_unusable_fractions_are_a_config_error(fractions: list[float] | None) -> None:
    with pytest.raises(ConfigError, match="split.fractions"):
        fold_plan(fractions)
