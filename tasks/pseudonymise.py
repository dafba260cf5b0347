"""Pseudonymise: replace patient identities by random pseudonyms kept in the identity vault.

Control 4.15 (pseudonymise data coming from the historical patient). Names and patient
references are replaced by a random pseudonym per patient (``P`` + 16 hex digits) and every
image gets an id (``I`` + 16 hex digits) derived from the sha256 of its file with its patient's
own random key. Both are stable across runs because the correspondence is kept in the identity
vault (``osteo.vault``: client-side encrypted, in the ``identity_vault`` store, reached as the
``svc_pseudonymise`` role) and nowhere else. DICOM headers are reduced to the display
attributes training needs: what ingest kept of them (modality, photometric interpretation,
bits stored, rescale, window, rows and columns) and the image statistics travel on, the rest of
the header never leaves ``work/``.

Reads    work/ingest/records.parquet, work/ingest/pixels/shard-*   (identifiable, local)
Writes   data/pseudonymised/records.parquet      no name, reference or birth date
         data/pseudonymised/pixels/shard-*       model inputs (float16); each record names
                                                 its shard and member
         data/quarantine/pseudonymise.csv        images whose pixels ingest did not keep
         reports/pseudonymise.json               counts (unit ``image``)
         work/pseudonymise/image_map.parquet     export file name -> image id (local only)

The stage never reads the export itself: ingest decoded each image once and kept the accepted
images' model inputs in shards under neutral member names (their rank in file name order); those
shards are published here as they are, hard-linked rather than copied where the disk allows.
Rows of the records table are ordered by image id, so their order does not follow the
export's file names. Quarantine rows name the image by its image id only (reason
``missing_pixels``); the local image map leads back to the export file.

Limitation: the shards themselves keep the accepted images in the export's file name order
(member ``000017`` is the eighteenth accepted file by name). Nobody can tell which patient an
image belongs to from that, but someone holding the export's list of file names could match
members to file names, which the image ids alone do not allow; shuffling the shards would cost
a second write of every image.

For synthetic exports, ``translate_ground_truth`` writes data/oracle/ground_truth.parquet
(image_id, t_score, true_label) from the generator's ground truth CSV, for the oracle AUC.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.progress import track
from osteo.quarantine import Quarantine
from osteo.shards import link_shards, shard_paths, stored_places
from osteo.summary import StageSummary
from osteo.vault import IdentityVault, PatientIdentity
from tasks.ingest import PIXEL_COLUMNS, ExportError
from tasks.ingest import RECORD_SCHEMA as INGEST_SCHEMA

logger = logging.getLogger(__name__)

STAGE = "pseudonymise"
CARRIED_COLUMNS = ("age", "sex", "bmi", "label", "n_readers", "reader_agreement",
                   *PIXEL_COLUMNS)
RECORD_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("patient_id", pa.string()),
    *[INGEST_SCHEMA.field(column) for column in CARRIED_COLUMNS],
    ("shard", pa.string()), ("member", pa.string()),
])
RECORD_COLUMNS = RECORD_SCHEMA.names
TRUTH_COLUMNS = ("image", "patient_ref", "t_score", "true_label")


def image_map_path(layout: Layout) -> Path:
    """work/pseudonymise/image_map.parquet: export file name -> image id (local only)."""
    return layout.root / "work" / "pseudonymise" / "image_map.parquet"


def ground_truth_path(layout: Layout) -> Path:
    """data/oracle/ground_truth.parquet: image_id, t_score, true_label of synthetic exports."""
    return layout.root / "data" / "oracle" / "ground_truth.parquet"


# ---------------------------------------------------------------------------------- stage


@task(name="pseudonymise", cache_policy=NO_CACHE)
def pseudonymise(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Pseudonymise the ingested records (see the module docstring).

    Args:
        layout: the project's paths.
        params: params.yaml (no setting of its own; kept for the common stage signature).

    Returns:
        The stage summary, also written to reports/pseudonymise.json.

    Raises:
        ConfigError: when ingest has not run, or the vault key file or storage is unusable.
        VaultError: when the identity vault refuses a request or an entry fails to decrypt.
    """
    started = time.perf_counter()

    # 1. The ingested records (identifiable, local).
    records = read_ingested(layout)

    # 2. Pseudonyms and image ids from the identity vault: created once, then reused.
    vault = IdentityVault.open(layout.root)
    patients, images = vault.resolve(_identities(records),
                                     dict(zip(records["sha256"], records["patient_ref"],
                                              strict=True)))
    records = records.assign(
        patient_id=records["patient_ref"].map(patients.ids),
        image_id=records["sha256"].map(images.ids),
    ).sort_values("image_id", ignore_index=True)
    vault_seconds = time.perf_counter() - started

    # 3. The model inputs ingest made, published as the pseudonymised shards.
    quarantine = Quarantine(STAGE)
    rows = write_shards(records, layout.ingest_pixel_dir, layout.pseudonymised_pixel_dir,
                        quarantine)

    # 4. Outputs: records without identity, quarantine, local image map, summary.
    write_records(rows, layout.pseudonymised_records)
    quarantine.write(layout.quarantine(STAGE))
    write_image_map(records, image_map_path(layout))
    summary = StageSummary(
        stage=STAGE, records_in=len(records), accepted=len(rows),
        quarantined=quarantine.by_reason(), unit="image", outputs=_outputs(layout),
        extra={
            "patients": len(patients.ids), "new_patients": patients.created,
            "new_images": images.created,
            "shards": len(shard_paths(layout.pseudonymised_pixel_dir)),
            "seconds": {"vault": round(vault_seconds, 3),
                        "total": round(time.perf_counter() - started, 3)},
        },
    )
    summary.write(layout.summary(STAGE))
    logger.info(
        "pseudonymise: %d images in, %d accepted, %d quarantined %s; %d patients (%d new) "
        "(%.1f s)", summary.records_in, summary.accepted, summary.quarantined_total,
        summary.quarantined, summary.extra["patients"], patients.created,
        summary.extra["seconds"]["total"],
    )
    logger.info("pseudonymise: wrote %s", ", ".join(summary.outputs.values()))
    return summary


def read_ingested(layout: Layout) -> pd.DataFrame:
    """work/ingest/records.parquet.

    Raises:
        ConfigError: when the ingest stage has not run.
    """
    if not layout.ingested_records.exists():
        raise ConfigError(f"{layout.ingested_records} not found: run the ingest stage first")
    return pd.read_parquet(layout.ingested_records)


def _identities(records: pd.DataFrame) -> list[PatientIdentity]:
    """One identity per patient, with the birth date of the patient's first image (in file name
    order) whose DICOM header has one."""
    without_birth_date = records["birth_date"].fillna("").eq("")
    patients = records.iloc[without_birth_date.argsort(kind="stable")]
    patients = patients.drop_duplicates("patient_ref")
    return [
        PatientIdentity(row.patient_ref, row.first_name, row.last_name, row.birth_date or "")
        for row in patients.itertuples(index=False)
    ]


def write_shards(
    records: pd.DataFrame, source_dir: Path, pixel_dir: Path, quarantine: Quarantine,
) -> list[dict[str, Any]]:
    """Publish the ingest stage's pixel shards as the pseudonymised shards.

    Ingest kept the accepted images' model inputs under neutral member names (their rank),
    so its shards hold no export file name and are published as they are: hard links, or
    copies where the disk has none (``osteo.shards.link_shards``). A record whose pixels are
    not in its shard goes to quarantine; a record of which ingest could make no model input
    (``input_reason``) has none and travels on without a shard, for the validate stage to
    quarantine with that reason.

    Args:
        records: ingested records with their ``image_id`` and ``patient_id``, in output order;
            ``pixel_shard`` and ``pixel_member`` say where ingest put each image's pixels.
        source_dir: work/ingest/pixels.
        pixel_dir: data/pseudonymised/pixels (old shards are removed).
        quarantine: where images whose pixels ingest did not keep go.

    Returns:
        One pseudonymised record per image with pixels, naming its shard and member.
    """
    link_shards(source_dir, pixel_dir)
    stored = stored_places(pixel_dir)
    rows: list[dict[str, Any]] = []
    for item in track(records.to_dict("records"), "pseudonymising records"):
        shard, member = str(item.get("pixel_shard") or ""), str(item.get("pixel_member") or "")
        if item.get("input_reason"):
            rows.append(_pseudonymised_row(item, None, None))  # validate quarantines it
            continue
        if (shard, member) not in stored:
            quarantine.add("work/ingest/records.parquet", "missing_pixels",
                           "the ingest stage kept no pixels for this image; run it again",
                           record_id=item["image_id"])
            continue
        rows.append(_pseudonymised_row(item, shard, member))
    return rows


def _pseudonymised_row(
    item: dict[str, Any], shard: str | None, member: str | None,
) -> dict[str, Any]:
    row = {"image_id": item["image_id"], "patient_id": item["patient_id"]}
    return row | {column: item[column] for column in CARRIED_COLUMNS} | {
        "shard": shard, "member": member}


def write_records(rows: list[dict[str, Any]], path: Path) -> None:
    """Write data/pseudonymised/records.parquet with exactly the contract's columns and types."""
    frame = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=RECORD_SCHEMA, preserve_index=False), path)


def write_image_map(records: pd.DataFrame, path: Path) -> None:
    """Write the local-only map from export file name to image id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records[["image", "image_id"]].sort_values("image").to_parquet(path, index=False)


def _outputs(layout: Layout) -> dict[str, str]:
    paths = {
        "records": layout.pseudonymised_records, "pixels": layout.pseudonymised_pixel_dir,
        "quarantine": layout.quarantine(STAGE), "image_map": image_map_path(layout),
    }
    return {name: path.relative_to(layout.root).as_posix() for name, path in paths.items()}


# ---------------------------------------------------------------------------------- oracle


def translate_ground_truth(layout: Layout, truth_csv: Path) -> Path:
    """Translate a synthetic export's ground truth to image ids, for the oracle AUC.

    Only images that were pseudonymised are kept; the patient reference is dropped.

    Args:
        layout: the project's paths (reads the image map and the pseudonymised records).
        truth_csv: the ground truth CSV (image, patient_ref, t_score, true_label), kept outside
            the export.

    Returns:
        The path of data/oracle/ground_truth.parquet (image_id, t_score, true_label).

    Raises:
        ExportError: when the ground truth file is missing or its columns differ.
        ConfigError: when the pseudonymise stage has not run.
    """
    if not truth_csv.is_file():
        raise ExportError(str(truth_csv), None, "ground truth file not found")
    truth = pd.read_csv(truth_csv, dtype={"image": str, "patient_ref": str, "true_label": str})
    missing = [column for column in TRUTH_COLUMNS if column not in truth.columns]
    if missing:
        raise ExportError(str(truth_csv), 1, f"missing columns: {', '.join(missing)}")
    if not image_map_path(layout).exists() or not layout.pseudonymised_records.exists():
        raise ConfigError("no pseudonymised records yet: run the pseudonymise stage first")

    image_map = pd.read_parquet(image_map_path(layout))
    kept = pd.read_parquet(layout.pseudonymised_records, columns=["image_id"])
    oracle = (
        truth.merge(image_map, on="image", how="inner")
        .loc[lambda frame: frame["image_id"].isin(kept["image_id"])]
        [["image_id", "t_score", "true_label"]]
        .astype({"t_score": "float64"})
        .sort_values("image_id", ignore_index=True)
    )
    path = ground_truth_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    oracle.to_parquet(path, index=False)
    logger.info("ground truth of %d pseudonymised images written to %s", len(oracle), path)
    return path
