"""Benchmark the synthetic clinic: how long ``osteo generate`` takes for the demo's export.

Generates an export with the repository's ``params.yaml`` settings (500 patients, about 750
radiographs of 512 x 416 by default) into a temporary directory and reports wall-clock and CPU
seconds, per image too, and the share spent rendering and encoding the radiographs (the tables
alone are generated again with ``write_images=False``). CPU seconds show the cost on an idle
machine when other work shares the cores. Target: well under 60 s for the demo's export.

Usage::

    .venv/bin/python bench/generate_speed.py [--patients 500] [--rows 512 --columns 416]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from osteo.config import PACKAGE_ROOT, load_params
from osteo.synthetic import generate_from_params


def timed(params: dict, out_dir: Path, **overrides: object) -> tuple[float, float, int]:
    """Wall and CPU seconds of one generation, and the number of images."""
    wall, cpu = time.perf_counter(), time.process_time()
    summary = generate_from_params(params, out_dir, **overrides)
    return time.perf_counter() - wall, time.process_time() - cpu, summary.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--columns", type=int, default=None)
    args = parser.parse_args()

    params = load_params(PACKAGE_ROOT)
    if args.rows and args.columns:
        params["generate"]["image_size"] = [args.rows, args.columns]
    size = "x".join(str(n) for n in params["generate"]["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        wall, cpu, images = timed(params, base / "full", patients=args.patients)
        tables_wall, _, _ = timed(params, base / "tables", patients=args.patients,
                                  write_images=False)
    print(f"{images} images of {size}: {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"({1000 * wall / images:.1f} ms wall, {1000 * cpu / images:.1f} ms CPU per image); "
          f"tables alone {tables_wall:.2f} s")


if __name__ == "__main__":
    main()
