"""Decode + transform throughput: streaming WebDataset shards vs reading the same images as files.

Both sides decode the same JPEG bytes with PIL and apply the same open_clip eval transform
(resize 224 bicubic, centre crop, normalise), with the same DataLoader worker count and batch size,
shuffled (shard streaming: shard order + sample buffer; files: a shuffled sampler).
Rounds alternate between the two so machine load hits both alike.

    python -m benchmarks.shards_vs_files [--n 3000] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from cirlab.data.shards import write_shards
from cirlab.data.streaming import StreamLoader, make_dataset


def make_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """n photo-like JPEGs (gradients, shapes, mild noise; ~10-20 KB each) in folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        base = c0 * x[..., None] + c1 * y[..., None] + rng.normal(0, 6, (size, size, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, 120, 2)
            draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"img{i:06d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


class FileImages(Dataset):
    """The baseline: one file per image, PIL open + RGB + transform."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def time_files(paths: list[Path], transform, workers: int, batch: int) -> float:
    loader = DataLoader(FileImages(paths, transform), batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    t0, n = time.perf_counter(), 0
    for b in loader:
        n += b.shape[0]
    assert n == len(paths)
    return n / (time.perf_counter() - t0)


def time_shards(folder: Path, total: int, transform, workers: int, batch: int) -> float:
    stream = make_dataset(folder, "image", transform=transform, resampled=False, shuffle_buffer=500,
                          batch_size=batch, equal_steps=False)
    t0, n = time.perf_counter(), 0
    for b in StreamLoader(stream, num_workers=workers):
        n += b["image"].shape[0]
    assert n == total and stream.error_count == 0
    return n / (time.perf_counter() - t0)


def cpu_ms_per_image(paths: list[Path], folder: Path, transform, batch: int) -> tuple[float, float]:
    """CPU time per image in this process (no workers): robust to other load on the machine."""
    from torch.utils.data import default_collate

    ds = FileImages(paths, transform)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.process_time()
    for k in range(0, len(order), batch):
        default_collate([ds[i] for i in order[k:k + batch]])
    files = time.process_time() - t0
    stream = make_dataset(folder, "image", transform=transform, resampled=False, shuffle_buffer=500,
                          batch_size=batch, equal_steps=False)
    t0 = time.process_time()
    n = sum(len(b["id"]) for b in StreamLoader(stream))
    shards = time.process_time() - t0
    return files / len(paths) * 1e3, shards / n * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    transform = image_transform(224, is_train=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_images(Path(tmp) / "files", args.n)
        write_shards(({"id": p.stem, "image": p} for p in paths), Path(tmp) / "shards", "image",
                     maxcount=args.shard_size)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.n} JPEGs 256x256 ({mb:.1f} MiB), shards of {args.shard_size}, prepared in "
              f"{time.perf_counter() - t0:.1f}s; workers={args.workers} batch={args.batch}")
        files, shards = [], []
        for r in range(args.rounds):
            files.append(time_files(paths, transform, args.workers, args.batch))
            shards.append(time_shards(Path(tmp) / "shards", args.n, transform, args.workers, args.batch))
            print(f"round {r}: files {files[-1]:.0f} img/s, shards {shards[-1]:.0f} img/s, "
                  f"ratio {shards[-1] / files[-1]:.2f}x")
        f, s = statistics.median(files), statistics.median(shards)
        print(f"median: files {f:.0f} img/s, shards {s:.0f} img/s, shards/files = {s / f:.2f}x")
        sub = paths[: min(len(paths), 1000)]
        write_shards(({"id": p.stem, "image": p} for p in sub), Path(tmp) / "cpu", "image", maxcount=args.shard_size)
        cf, cs = cpu_ms_per_image(sub, Path(tmp) / "cpu", transform, args.batch)
        print(f"CPU per image, one process, {len(sub)} images: files {cf:.2f} ms, shards {cs:.2f} ms "
              f"(files/shards = {cf / cs:.2f}x)")


if __name__ == "__main__":
    main()
