"""Tar shards: cirlab.data.tar_format (reader and writer) vs webdataset's tarfile-based ones, same
files, same run (CPU seconds, best of --repeats). Reading: every member of the triplet and pair
shards of a synthetic world, through `iter_tar_members` vs `webdataset.tariterators.
tar_file_iterator`. Writing: the same samples through `ShardTarWriter` vs `webdataset.TarWriter`
(the two outputs are compared byte for byte).

Run: python -m benchmarks.tar_members [--scenes 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (page cache)
    ts = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return min(ts)


def main() -> None:
    import webdataset as wds
    from webdataset.tariterators import tar_file_iterator

    from cirlab.data.synthetic import build_world
    from cirlab.data.tar_format import ShardTarWriter, iter_tar_members

    p = argparse.ArgumentParser()
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cirlab-bench-tar-"))
    world = build_world(tmp / "world", n_train_scenes=a.scenes, n_eval_queries=50)
    shards = sorted((world.root / "triplets" / "train").glob("*.tar")) + sorted((world.root / "pairs").glob("*.tar"))
    members = sum(1 for s in shards for _ in iter_tar_members(open(s, "rb")))

    def read_ours() -> None:
        for s in shards:
            with open(s, "rb") as f:
                for _ in iter_tar_members(f):
                    pass

    def read_tarfile() -> None:
        for s in shards:
            with open(s, "rb") as f:
                for _ in tar_file_iterator(f):
                    pass

    samples: list[dict] = []
    for s in shards:
        cur: dict = {}
        with open(s, "rb") as f:
            for name, data in iter_tar_members(f):
                key, _, ext = name.partition(".")
                if cur and cur["__key__"] != key:
                    samples.append(cur)
                    cur = {}
                cur.setdefault("__key__", key)
                cur[ext] = data
        if cur:
            samples.append(cur)

    def write_ours() -> None:
        with ShardTarWriter(str(tmp / "ours.tar"), mtime=0) as w:
            for x in samples:
                w.write(x)

    def write_wds() -> None:
        w = wds.TarWriter(str(tmp / "wds.tar"), mtime=0)
        for x in samples:
            w.write(x)
        w.close()

    r_ours, r_ref = _best(read_ours, a.repeats), _best(read_tarfile, a.repeats)
    w_ours, w_ref = _best(write_ours, a.repeats), _best(write_wds, a.repeats)
    same = (tmp / "ours.tar").read_bytes() == (tmp / "wds.tar").read_bytes()
    print(f"{len(shards)} shards, {members} members, {len(samples)} samples")
    print(f"read : ours {r_ours:.3f} s CPU, tarfile {r_ref:.3f} s  -> ratio {r_ours / r_ref:.2f}")
    print(f"write: ours {w_ours:.3f} s CPU, TarWriter {w_ref:.3f} s  -> ratio {w_ours / w_ref:.2f}; "
          f"identical bytes: {same}")


if __name__ == "__main__":
    main()
