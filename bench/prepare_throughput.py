"""Benchmark the data preparation: images per second for each stage, and the ratio of the whole
preparation to a bare decode-and-resize loop over the same files (target: at most 1.3).

The bare loop is what any preparation must do at the very least: read each export file, decode
its pixels and resize them with the same antialiased bilinear resize the pipeline uses, in one
thread. The ingest stage spreads its per-image work over one worker process per core; the CPU
seconds (of every thread of this process and of the finished worker processes, not of the
SeaweedFS server) show what the work costs apart from its spread over the cores. The
stages are run in-process through the same functions the Prefect tasks and ``dvc repro`` call,
against a real embedded SeaweedFS server (the pseudonymise stage writes the identity vault).
With ``--flow`` the whole Prefect flow (with DVC commit, without push) is timed as well, to show
the orchestration overhead separately.

The script also measures a floor: ingest's per-image work alone (read, sha256, header checks,
decode, statistics, model input, content key), on the same worker pool, with nothing joined,
written or passed on; added to the other four stages' median time on the reruns, it is what the
whole preparation would take if ingest cost nothing beyond that work. The ratio of that floor
to the bare loop tells how far the target can be reached on this machine at all.

Usage::

    .venv/bin/python bench/prepare_throughput.py --patients 400
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from osteo.config import PACKAGE_ROOT, load_params
from osteo.dvc import init_project
from osteo.layout import Layout
from osteo.runtime import prepare_environment, set_param
from osteo.seaweed import EmbeddedS3


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the ingest workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bare_decode_and_resize(images: list[Path], size: int) -> tuple[float, float]:
    """Wall and CPU seconds to decode every file and resize it, nothing else, in one loop."""
    from tasks.preprocess import resize_bilinear, single_threaded

    started, cpu = time.perf_counter(), cpu_seconds()
    with single_threaded():
        for path in images:
            if path.suffix == ".dcm":
                pixels = pydicom.dcmread(path).pixel_array
            else:
                with Image.open(path) as image:
                    pixels = np.asarray(image)
            resize_bilinear(pixels.astype(np.float32), size)
    return time.perf_counter() - started, cpu_seconds() - cpu


def per_image_work_alone(images: list[Path], size: int) -> float:
    """Wall seconds of ingest's per-image work on its worker pool, with nothing else done.

    The workers run ``inspect_images`` as in the ingest stage; their results are dropped.
    """
    from osteo.parallel import SharedArrays, ordered_map
    from tasks.ingest import BATCH_IMAGES, IN_FLIGHT, batch_plan, inspect_images, worker_pool

    batches, names, regions = batch_plan(images, [path.name for path in images])
    started = time.perf_counter()
    with (SharedArrays(IN_FLIGHT, BATCH_IMAGES, (size, size), "float16") as inputs,
          worker_pool(inputs.spec) as pool):
        for _ in ordered_map(pool, inspect_images, batches, names, [size] * len(batches), regions,
                             ahead=IN_FLIGHT):
            pass
    return time.perf_counter() - started


def run_stages(project: Path) -> list[tuple[str, int, float, float]]:
    """Run every data stage once; returns (stage, records in, wall s, CPU s) per stage."""
    from flows.prepare import DATA_STAGES

    layout, params = Layout(project), load_params(project)
    timings = []
    for name, stage in DATA_STAGES.items():
        started, cpu = time.perf_counter(), cpu_seconds()
        summary = stage.fn(layout, params)
        timings.append((name, summary.records_in, time.perf_counter() - started,
                        cpu_seconds() - cpu))
    return timings


def make_project(base: Path, patients: int, rows: int, columns: int) -> tuple[Path, Path]:
    """A DVC project and a synthetic export of the requested size."""
    from osteo.synthetic import generate_from_params

    project = base / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(PACKAGE_ROOT / name, project / name)
    shutil.copytree(PACKAGE_ROOT / "expectations", project / "expectations")
    init_project(project)
    export = base / "export"
    set_param(project, "generate.patients", patients)
    set_param(project, "generate.image_size", [rows, columns])
    set_param(project, "export.path", str(export))
    generate_from_params(load_params(project), export, truth_path=base / "export.truth.csv")
    return project, export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--columns", type=int, default=416)
    parser.add_argument("--passes", type=int, default=2, help="runs of the stages (default 2)")
    parser.add_argument("--flow", action="store_true", help="also time the whole Prefect flow")
    args = parser.parse_args()

    prepare_environment()
    base = Path(tempfile.mkdtemp(prefix="osteo-bench-"))
    os.environ["OSTEO_VAULT_KEY_FILE"] = str(base / "vault.key")
    with EmbeddedS3(base / "s3") as server:
        os.environ.update(server.environment())

        # 1. The export, then the bare loop: once to fill the page cache (the stages read from
        #    it too), then the best of three runs, so that a slow moment of the machine does not
        #    flatter the ratio.
        project, export = make_project(base, args.patients, args.rows, args.columns)
        images = sorted((export / "images").iterdir())
        size = int(load_params(project)["preprocess"]["size"])
        bare_decode_and_resize(images, size)
        bare, bare_cpu = min(bare_decode_and_resize(images, size) for _ in range(3))

        # 2. The stages, in-process, twice: the first pass writes to new files (on the
        #    development machine's virtual disk, first writes to unused blocks are several times
        #    slower), the second rewrites them, as a scheduled re-run does.
        passes = [run_stages(project) for _ in range(args.passes)]

        # 3. The floor: ingest's per-image work alone, the best of three runs.
        work_alone = min(per_image_work_alone(images, size) for _ in range(3))

        # 4. Optionally the whole flow, orchestration and DVC commit included.
        flow_seconds = None
        if args.flow:
            from flows.prepare import prepare_dataset

            started = time.perf_counter()
            prepare_dataset(str(project), push=False)
            flow_seconds = time.perf_counter() - started

    print(f"{len(images)} images of {args.rows}x{args.columns}, output {size}x{size}, "
          f"{os.cpu_count()} cores")
    for number, timings in enumerate(passes, start=1):
        report_pass(number, timings, len(images), bare, bare_cpu)
    if len(passes) > 2:
        reruns = [sum(seconds for _, _, seconds, _ in timings) / bare for timings in passes[1:]]
        print(f"ratio of the reruns (passes 2-{len(passes)}): median {np.median(reruns):.2f}, "
              f"best {min(reruns):.2f}, worst {max(reruns):.2f}")
    report_floor(passes, work_alone, bare)
    if flow_seconds is not None:
        print(f"Prefect flow incl. orchestration and dvc commit: {flow_seconds:.2f} s")
    shutil.rmtree(base, ignore_errors=True)


def report_pass(
    number: int, timings: list[tuple[str, int, float, float]], images: int, bare: float,
    bare_cpu: float,
) -> None:
    """Print one pass of the stages against the bare loop."""
    total = sum(seconds for _, _, seconds, _ in timings)
    total_cpu = sum(cpu for _, _, _, cpu in timings)
    print(f"pass {number}")
    print(f"{'step':<28}{'images':>8}{'seconds':>10}{'images/s':>10}{'CPU s':>10}")
    print(f"{'bare decode + resize':<28}{images:>8}{bare:>10.2f}{images / bare:>10.1f}"
          f"{bare_cpu:>10.2f}")
    for name, count, seconds, cpu in timings:
        print(f"{name:<28}{count:>8}{seconds:>10.2f}{count / seconds:>10.1f}{cpu:>10.2f}")
    print(f"{'whole preparation':<28}{images:>8}{total:>10.2f}{images / total:>10.1f}"
          f"{total_cpu:>10.2f}")
    print(f"ratio whole preparation / bare loop: {total / bare:.2f} (target <= 1.3); "
          f"in CPU time: {total_cpu / bare_cpu:.2f}")


def report_floor(
    passes: list[list[tuple[str, int, float, float]]], work_alone: float, bare: float,
) -> None:
    """Print the floor: ingest's per-image work alone plus the other stages' median time."""
    from tasks.ingest import WORKERS

    reruns = passes[1:] or passes
    others = float(np.median([sum(seconds for name, _, seconds, _ in timings if name != "ingest")
                              for timings in reruns]))
    print(f"ingest's per-image work alone on its {WORKERS} worker processes: "
          f"{work_alone:.2f} s ({work_alone / bare:.2f} x the bare loop)")
    print(f"the other four stages, median of the reruns: {others:.2f} s "
          f"({others / bare:.2f} x the bare loop)")
    print(f"floor of the whole preparation: {(work_alone + others) / bare:.2f} x the bare loop "
          "(target <= 1.3)")


if __name__ == "__main__":
    main()
