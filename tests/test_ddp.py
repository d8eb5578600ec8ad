"""Two real processes (Lightning DDP on CPU, gloo) training the pair task from shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cirlab.data.shards import read_index, write_shards


def test_ddp_ranks_see_different_samples_and_take_equal_steps(small_world, tmp_path):
    # uneven shards (3 shards of 70, 70, 60 samples) so a naive split would give ranks unequal counts
    from cirlab.data.streaming import ShardStream

    src = ShardStream(small_world.path("pairs"), "pair", resampled=False, shuffle=False, shuffle_buffer=0,
                      batch_size=None, rank=0, world_size=1, equal_steps=False)
    samples = []
    for s in src:
        s.pop("__stream__", None)
        samples.append(s)
    write_shards(samples, tmp_path / "pairs", "pair", maxcount=70)
    total = read_index(tmp_path / "pairs").total
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("ddp_pair_script.py")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "pairs"), str(out),
                        str(small_world.path("pairs_val"))], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(x["world"] == 2 for x in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == total // (2 * 16)
    a, b = set(ranks[0]["ids"]), set(ranks[1]["ids"])
    assert not a & b, "ranks trained on the same samples"
    # the rank with fewer samples wraps around its own shards to keep step with the other (no hang)
    assert len(a | b) >= 0.75 * total
    # DDP kept the replicas identical
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # validation ranks the whole held-out set on every rank (gathered), so both report the same
    assert ranks[0]["val"] and ranks[0]["val"] == ranks[1]["val"]
    n_val = read_index(small_world.path("pairs_val")).total
    # chance level 1/#distinct captions of the gathered set: more than one rank's share was ranked
    assert ranks[0]["val"]["chance_i2t_R@1"] <= 100.0 / (n_val // 2 + 1)
