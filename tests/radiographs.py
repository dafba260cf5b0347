"""Real radiographs for tests, from the ``pydicom-data`` package (no download at run time)."""

from __future__ import annotations

import pydicom
from pydicom.data import get_testdata_file


def read_test_radiograph(name: str) -> pydicom.Dataset:
    """One of pydicom-data's computed radiographs, e.g. ``RG1_UNCR.dcm`` (chest) or
    ``RG3_UNCR.dcm`` (tibia).

    Raises:
        FileNotFoundError: when the installed pydicom-data does not hold the file.
    """
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise FileNotFoundError(f"{name} is not in the installed pydicom-data package")
    return pydicom.dcmread(path)
