"""Training throughput: the Lightning fit of osteo against a bare torch loop on the same work.

Both sides train the same network (MobileNetV2 with ImageNet weights, fused with age, sex and
BMI, backbone blocks from ``--unfreeze-from`` learning) on the same random batches: same batch
size, same number of steps, same CPU threads, same augmentation, class-weighted
loss and AdamW step. Lightning's share of the time is what its loops, hooks, logging and
callbacks add; the target is a ratio of at least 0.95.

Only steps after ``--warmup`` are timed, from the start of the first timed step to the end of
the last, so loading the next batch between steps counts on both sides. The two sides
alternate for ``--rounds`` rounds; the best and the median round of each are reported (the
machine may be shared: on the development machine single steps of either side now and then
take half as long again, whichever side is running).

Run: ``python bench/train_throughput.py --image-size 224 --batch-size 32 --steps 15``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from models.data import RadiographDataset, SplitTensors, augment_labels
from models.module import BackboneFreeze, OsteoModule, configure_cpu
from tasks.train import keep_determinism_flag, quiet_lightning

CLINICAL_STATS = {"age_mean": 65.0, "age_std": 10.0, "bmi_mean": 25.0, "bmi_std": 4.0}


def random_batches(args: argparse.Namespace) -> DataLoader:
    """A loader over random prepared-like data: float16 images, clinical rows, 1 in 3 positive."""
    n = args.batch_size * (args.warmup + args.steps)
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, args.image_size, args.image_size)).astype(np.float16)
    clinical = np.stack([rng.uniform(40, 90, n), rng.integers(0, 2, n), rng.normal(25, 4, n)], 1)
    labels = (np.arange(n) % 3 == 0).astype(np.int64)
    split = SplitTensors(pd.DataFrame(index=range(n)), torch.from_numpy(images),
                         torch.from_numpy(clinical.astype(np.float32)), torch.from_numpy(labels))
    return DataLoader(RadiographDataset(split), batch_size=args.batch_size, shuffle=False)


def new_module(args: argparse.Namespace) -> OsteoModule:
    torch.manual_seed(0)
    return OsteoModule(clinical_stats=CLINICAL_STATS, image_size=args.image_size,
                       class_weights=[0.75, 1.5], augment_labels=[0, 1], max_epochs=1)


class StepClock(L.Callback):
    """Wall time from the start of step ``first`` to the end of the last step."""

    def __init__(self, first: int) -> None:
        self.first, self.start, self.end = first, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        self.end = time.perf_counter()


def lightning_seconds(args: argparse.Namespace, loader: DataLoader) -> float:
    """Timed seconds of the Lightning fit, configured as the train stage configures it."""
    module, clock = new_module(args), StepClock(args.warmup)
    with tempfile.TemporaryDirectory() as scratch, keep_determinism_flag(), quiet_lightning():
        trainer = L.Trainer(
            accelerator="auto", devices=1, max_steps=args.warmup + args.steps, max_epochs=1,
            callbacks=[BackboneFreeze(0, args.unfreeze_from), clock],
            logger=CSVLogger(scratch, name="", version=""), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True,
            default_root_dir=Path(scratch),
        )
        trainer.fit(module, train_dataloaders=loader)
    return clock.end - clock.start


def bare_seconds(args: argparse.Namespace, loader: DataLoader) -> float:
    """Timed seconds of a plain torch loop doing the same steps on the same batches."""
    module = new_module(args)
    net, hparams = module.net, module.hparams
    net.set_trainable_from(args.unfreeze_from)
    net.train()
    optimiser = module.configure_optimizers()["optimizer"]
    weight = module.class_weight
    with keep_determinism_flag():
        torch.use_deterministic_algorithms(True)
        for step, (images, clinical, labels) in enumerate(loader):
            if step == args.warmup:
                start = time.perf_counter()
            images = augment_labels(images, labels, hparams["augment_labels"])
            loss = F.cross_entropy(net(images, clinical), labels, weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--unfreeze-from", type=int, default=15, help="first learning block")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")

    threads = configure_cpu(args.threads)
    loader = random_batches(args)
    timings: dict[str, list[float]] = {"bare torch loop": [], "Lightning fit": []}
    for _ in range(args.rounds):
        timings["bare torch loop"].append(bare_seconds(args, loader))
        timings["Lightning fit"].append(lightning_seconds(args, loader))

    images = args.steps * args.batch_size
    rate = {name: images / min(seconds) for name, seconds in timings.items()}
    median = {name: images / float(np.median(seconds)) for name, seconds in timings.items()}
    print(f"training throughput: {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, blocks {args.unfreeze_from}+ learning, "
          f"{threads} threads, {args.rounds} rounds")
    print(f"{'':18}{'best s':>10}{'images/s':>10}{'median s':>10}{'images/s':>10}")
    for name, seconds in timings.items():
        print(f"{name:18}{min(seconds):>10.2f}{rate[name]:>10.1f}"
              f"{float(np.median(seconds)):>10.2f}{median[name]:>10.1f}")
    print(f"ratio Lightning / bare: {rate['Lightning fit'] / rate['bare torch loop']:.3f} best, "
          f"{median['Lightning fit'] / median['bare torch loop']:.3f} median (target >= 0.95)")


if __name__ == "__main__":
    main()
