"""Single-image inference latency of the osteoporosis network on one CPU thread.

What a radiologist waits for after an X-ray: one prepared image and its patient's age, sex and
BMI through ``models.module.predict`` (tensor conversion, standardisation, MobileNetV2, fusion,
SoftMax). The network is rebuilt from a checkpoint written to a temporary directory, as the
diagnostic system would load it. Random data of the right shape; no dataset needed.

Reports the median, 95th percentile, mean and minimum over ``--runs`` calls after ``--warmup``
calls.

Run: ``python bench/inference_latency.py --image-size 224 --runs 100``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.module import OsteoModule, configure_cpu, load_model, predict

CLINICAL_STATS = {"age_mean": 65.0, "age_std": 10.0, "bmi_mean": 25.0, "bmi_std": 4.0}


def saved_network(image_size: int, directory: Path) -> Path:
    """A checkpoint of the network with the ImageNet backbone (head untrained)."""
    module = OsteoModule(clinical_stats=CLINICAL_STATS, image_size=image_size)
    path = directory / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # 1. The network as the diagnostic system loads it, on the requested threads.
    threads = configure_cpu(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        net, _ = load_model(saved_network(args.image_size, Path(scratch)))

    # 2. One image at a time.
    rng = np.random.default_rng(0)
    image = rng.random((1, args.image_size, args.image_size)).astype(np.float16)
    for _ in range(args.warmup):
        predict(net, image, [70.0], ["F"], [23.5])
    latencies = []
    for _ in range(args.runs):
        start = time.perf_counter()
        predict(net, image, [70.0], ["F"], [23.5])
        latencies.append((time.perf_counter() - start) * 1000)

    # 3. The table.
    values = np.array(latencies)
    print(f"single-image inference: {args.image_size} px, {threads} thread(s), "
          f"{args.runs} runs after {args.warmup} warm-up")
    print(f"{'median ms':>10}{'p95 ms':>10}{'mean ms':>10}{'min ms':>10}{'images/s':>10}")
    print(f"{np.median(values):>10.1f}{np.percentile(values, 95):>10.1f}{values.mean():>10.1f}"
          f"{values.min():>10.1f}{1000 / np.median(values):>10.1f}")


if __name__ == "__main__":
    main()
