"""The synthetic clinic: a reproducible hospital export of lumbar radiographs with known truth.

No labelled osteoporosis X-ray set can be used offline, and none should be used to develop the
pipeline: the synthetic clinic lets every stage be built and tested without a single real
patient's data (ENISA control 4.23, implement a privacy by design process). From a seed it
writes what a hospital's PACS and patient file would export:

* ``population``: patients over 50 (names, hospital reference, age, sex, BMI, birth date) and
  their latent T-score, with the WHO label (T <= -2.5 is osteoporosis);
* ``phantom``: a lateral lumbar spine radiograph per image, the bone following the T-score;
* ``dicom``: CR and DX DICOM files carrying every identifying attribute of a real export, some
  MONOCHROME1, 12 or 14 bits stored, or 16-bit PNG;
* ``readers``: accredited double reading with adjudication, plus an unaccredited trainee
  (the material for ENISA control 4.28, use reliable sources to label data);
* ``export``: the export directory (``patients.csv``, ``annotations.csv``, ``images/``) and the
  ground truth outside it, used only to evaluate the model against an oracle.
"""

from osteo.synthetic.export import (
    ExportExistsError,
    GenerationSettings,
    GenerationSummary,
    default_truth_path,
    generate_export,
    generate_from_params,
    settings_from_params,
)

__all__ = [
    "ExportExistsError",
    "GenerationSettings",
    "GenerationSummary",
    "default_truth_path",
    "generate_export",
    "generate_from_params",
    "settings_from_params",
]
