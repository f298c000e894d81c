"""Input-pipeline throughput, in images/s of one worker process, on the same challenge-format files:

  (a) seed     the seed's way: a PyTorch map dataset reading each DICOM with pydicom's default decoder,
               augmenting at 1024² in RGB and resizing last, batched by a single-process DataLoader;
  (b) dicom    siim-jax's train iterator decoding the DICOMs on the fly;
  (c) prepared siim-jax's train iterator on the `siim-jax prepare` cache.

Each path runs single-threaded (OpenCV and torch at one thread, no worker processes) over every image, after an
untimed warm-up pass; each rate is the best of a few passes (also printed per CPU second, which load from other
processes disturbs less). The last line printed is one JSON object with the wall-clock rates, the ratios b/a
and c/a, the training size `image_size` and `host_bytes_per_image`: the bytes the host hands the devices per
training image (uint8 image and mask, and the few bytes of labels; goal at most 2·S² + 1 KiB at size S).

    python tools/bench_input.py                    # 64 synthetic images in a temporary folder
    python tools/bench_input.py --data DIR --size 512 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pydicom
import torch
from siim_jax.configs.defaults import default_augment_config, default_data_config

from siim_jax.data import layout, pipeline, rle, synthetic, tfds_siim
from siim_jax.data.labels import build_index


class SeedStyleDataset(torch.utils.data.Dataset):
    """The seed's train dataset: pydicom decode, RGB, augment at full size, resize last, normalise."""

    def __init__(self, frame: pd.DataFrame, image_size: int):
        self.paths, self.rles = list(frame["path"]), list(frame["rles"])
        seed = default_augment_config()
        self.transform = A.Compose(
            [
                A.HorizontalFlip(p=seed.hflip_p),
                A.Affine(
                    scale=(1 - seed.scale, 1 + seed.scale),
                    rotate=(-seed.rotate, seed.rotate),
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=seed.affine_p,
                ),
                A.GaussNoise(std_range=seed.noise_std_range, p=seed.noise_p),
                A.Resize(image_size, image_size),
                A.Normalize(),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pydicom.dcmread(self.paths[index]).pixel_array
        image = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        mask = rle.decode_merged(self.rles[index], *pixels.shape).astype(np.uint8)
        out = self.transform(image=image, mask=mask)
        return torch.from_numpy(out["image"].transpose(2, 0, 1)), torch.from_numpy(out["mask"][None].astype(np.float32))


def timed_pass(make_batches) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process, over one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    seen = sum(len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["image"]) for batch in make_batches())
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)


def host_bytes_per_image(batch: dict[str, np.ndarray]) -> float:
    """Bytes of a training batch, every entry of which goes to the devices, per image."""
    return sum(value.nbytes for value in batch.values()) / len(batch["image"])


def best_rates(paths: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall-clock and best CPU-time rate of each path: an untimed warm-up pass, then `rounds` passes taken
    in turn, so that load from other processes on a shared machine slows every path alike and spares the best
    pass of each. Every path is single-threaded, so on an idle machine both rates agree."""
    for make_batches in paths.values():
        timed_pass(make_batches)
    wall, cpu = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, make_batches in paths.items():
            wall_rate, cpu_rate = timed_pass(make_batches)
            wall[name], cpu[name] = max(wall[name], wall_rate), max(cpu[name], cpu_rate)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="challenge-format tree (default: a new synthetic one)")
    parser.add_argument("--n-images", type=int, default=64, help="synthetic training images (default 64)")
    parser.add_argument("--size", type=int, default=512, help="training size (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per path, best kept (default 3)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch) / "synthetic"
        if args.data is None:
            synthetic.generate(root, args.n_images, 0, seed=0, progress=False)
        frame = build_index(root / layout.TRAIN_DIR, root / layout.TRAIN_CSV, group_by_patient=False).frame
        start = time.perf_counter()
        prepared = tfds_siim.prepare(root, args.size, Path(scratch) / "prepared")
        print(f"prepare: {len(frame)} images at {args.size}² in {time.perf_counter() - start:.1f} s")
        prepared_frame = tfds_siim.index_frame(prepared, "train").query("record >= 0")
        frame = frame[frame["image_id"].isin(prepared_frame["image_id"])]  # files that decode, in both

        config = default_data_config()
        config.update({"root": str(root), "image_size": args.size, "workers": 0, "prefetch": 0})
        config.balance.mode = "none"
        prepared_config = config.copy_and_resolve_references()
        prepared_config.prepared_dir = str(Path(scratch) / "prepared")
        usable = len(frame) // args.batch_size * args.batch_size
        frame, prepared_frame = frame.iloc[:usable], prepared_frame.iloc[:usable]

        seed_loader = torch.utils.data.DataLoader(
            SeedStyleDataset(frame, args.size), batch_size=args.batch_size, shuffle=True, num_workers=0
        )
        rates, cpu_rates = best_rates(
            {
                "seed_img_s": lambda: iter(seed_loader),
                "dicom_img_s": lambda: pipeline.train_iterator(config, frame, [0], args.batch_size, 0, 1),
                "prepared_img_s": lambda: pipeline.train_iterator(
                    prepared_config, prepared_frame, [0], args.batch_size, 0, 1
                ),
            },
            args.rounds,
        )
        with contextlib.closing(
            pipeline.train_iterator(prepared_config, prepared_frame, [0], args.batch_size, 0, 1)
        ) as batches:
            bytes_per_image = host_bytes_per_image(next(batches))
    rates["dicom_ratio"] = rates["dicom_img_s"] / rates["seed_img_s"]
    rates["prepared_ratio"] = rates["prepared_img_s"] / rates["seed_img_s"]
    print(f"(a) seed {rates['seed_img_s']:.1f} img/s, (b) dicom {rates['dicom_img_s']:.1f} img/s, "
          f"(c) prepared {rates['prepared_img_s']:.1f} img/s per worker process at {args.size}²")
    print(f"b/a = {rates['dicom_ratio']:.2f} (goal >= 2), c/a = {rates['prepared_ratio']:.2f} (goal >= 5)")
    seed_cpu = cpu_rates["seed_img_s"]
    print(f"per CPU second: seed {seed_cpu:.1f}, dicom {cpu_rates['dicom_img_s']:.1f}, prepared "
          f"{cpu_rates['prepared_img_s']:.1f} img/s; b/a = {cpu_rates['dicom_img_s'] / seed_cpu:.2f}, "
          f"c/a = {cpu_rates['prepared_img_s'] / seed_cpu:.2f}")
    goal = 2 * args.size**2 + 1024
    print(f"host to device: {bytes_per_image:.0f} bytes per training image (goal <= {goal})")
    summary = {key: round(value, 2) for key, value in rates.items()}
    print(json.dumps({**summary, "image_size": args.size, "host_bytes_per_image": bytes_per_image}))


if __name__ == "__main__":
    main()
