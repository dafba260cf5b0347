"""Oracle stage: the synthetic export's ground truth, translated to pseudonymous image ids.

A synthetic export comes with its ground truth (T-score, true label) in a file kept outside the
export. The evaluation compares the model with an oracle that knows the true T-score; to do so
without any patient reference, this stage maps the ground truth onto the pseudonymous image ids
through the local image map of the pseudonymise stage. Real exports have no ground truth: then
params ``export.truth`` is null and the stage writes an empty table.

Reads: params ``export.truth``, ``work/pseudonymise/image_map.parquet``.
Writes: ``data/oracle/ground_truth.parquet`` (image_id, t_score, true_label).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from osteo.layout import Layout
from tasks.pseudonymise import translate_ground_truth

logger = logging.getLogger(__name__)

GROUND_TRUTH = Path("data/oracle/ground_truth.parquet")


@task(name="oracle")
def oracle(layout: Layout, params: dict[str, Any]) -> Path | None:
    """Translate the ground truth named by params ``export.truth``, if any.

    Args:
        layout: paths of the project.
        params: ``params.yaml``.

    Returns:
        The ground-truth table, or None when the export has no ground truth.
    """
    truth = (params.get("export") or {}).get("truth")
    if not truth:
        path = layout.root / GROUND_TRUTH
        path.parent.mkdir(parents=True, exist_ok=True)
        empty = pd.DataFrame({"image_id": pd.Series(dtype=str),
                              "t_score": pd.Series(dtype=float),
                              "true_label": pd.Series(dtype=str)})
        empty.to_parquet(path, index=False)
        logger.info("oracle: no ground truth for this export (params export.truth is null)")
        return None
    path = translate_ground_truth(layout, _resolve(layout.root, truth))
    logger.info("oracle: ground truth of %d images in %s",
                len(pd.read_parquet(path)), GROUND_TRUTH)
    return path


def _resolve(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path
