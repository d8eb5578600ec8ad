"""Benchmark: cirlab.train.ranking.rank vs faiss IndexFlatIP (exact), time and peak memory, same run.

Run: python -m benchmarks.ranking_vs_faiss [--n 1000000 --q 1000 --dim 512 --k 50 --threads 2]
Each method runs in a fresh subprocess that first loads the gallery; its peak extra memory is
ru_maxrss after the method minus ru_maxrss once the gallery is loaded (imports done before).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _maxrss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_name() -> str:
    """CPU model from /proc/cpuinfo where available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other jobs on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _make_data(path: Path, n: int, q: int, dim: int, seed: int) -> None:
    """Random L2-normalised float32 gallery and queries, written as .npy files (normalised in place)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(q, dim, generator=g)
    queries /= queries.norm(dim=1, keepdim=True)
    np.save(path / "queries.npy", queries.numpy())
    gallery = torch.randn(n, dim, generator=g)
    for s in range(0, n, 65536):  # in place, chunk by chunk: no second copy of the gallery
        block = gallery[s:s + 65536]
        block /= block.norm(dim=1, keepdim=True)
    np.save(path / "gallery.npy", gallery.numpy())


def _child(method: str, data: Path, out: Path, k: int, threads: int, qc: int, gc: int) -> None:
    """Load the gallery, then time one method and record its peak memory above that baseline."""
    import torch

    torch.set_num_threads(threads)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    else:
        from cirlab.train.ranking import rank
    queries = np.load(data / "queries.npy")
    gallery = np.load(data / "gallery.npy")
    baseline = _maxrss_bytes()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    if method == "faiss":
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)
        scores, indices = index.search(queries, k)
    else:
        s, i = rank(torch.from_numpy(queries), torch.from_numpy(gallery), k, query_chunk=qc, gallery_chunk=gc)
        scores, indices = s.numpy(), i.numpy()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    extra = _maxrss_bytes() - baseline
    np.save(out / f"{method}_scores.npy", scores)
    np.save(out / f"{method}_indices.npy", indices.astype(np.int64))
    print(json.dumps({"method": method, "seconds": seconds, "cpu_seconds": cpu, "extra_bytes": extra,
                      "baseline_bytes": baseline, "gallery_bytes": gallery.nbytes}))


def _run_child(method: str, args: argparse.Namespace, data: Path) -> dict:
    """Run one method in a fresh interpreter and parse its json line."""
    cmd = [sys.executable, "-m", "benchmarks.ranking_vs_faiss", "--child", method, "--data", str(data),
           "--k", str(args.k), "--threads", str(args.threads), "--query-chunk", str(args.query_chunk),
           "--gallery-chunk", str(args.gallery_chunk)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check_results(data: Path) -> dict:
    """Same top-k as faiss up to ties: equal sorted scores, and our scores match float64 recomputation."""
    ours_s, ours_i = np.load(data / "ours_scores.npy"), np.load(data / "ours_indices.npy")
    fa_s, fa_i = np.load(data / "faiss_scores.npy"), np.load(data / "faiss_indices.npy")
    queries = np.load(data / "queries.npy").astype(np.float64)
    gallery = np.load(data / "gallery.npy", mmap_mode="r")
    exact = np.einsum("qd,qkd->qk", queries, gallery[ours_i.reshape(-1)].reshape(*ours_i.shape, -1).astype(np.float64))
    same_pos = float((ours_i == fa_i).mean())
    same_set = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ours_i, fa_i)]))
    return {
        "identical_index_fraction": same_pos,
        "shared_topk_fraction": same_set,
        "max_abs_score_diff_vs_faiss": float(np.abs(ours_s - fa_s).max()),
        "max_abs_score_diff_vs_float64": float(np.abs(ours_s - exact).max()),
        "ok": bool(np.abs(ours_s - fa_s).max() < 1e-5 and np.abs(ours_s - exact).max() < 1e-5),
    }


def main() -> None:
    """Generate data once, run each method (alternating, `--repeats` times), compare and print a summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--q", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--query-chunk", type=int, default=1024)
    p.add_argument("--gallery-chunk", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per method; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ours", "faiss"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.data, args.data, args.k, args.threads, args.query_chunk, args.gallery_chunk)
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="rank_bench_") as tmp:
        data = Path(tmp)
        _make_data(data, args.n, args.q, args.dim, args.seed)
        runs: dict[str, list[dict]] = {"ours": [], "faiss": []}
        for _ in range(args.repeats):
            for method in ("ours", "faiss"):
                runs[method].append(_run_child(method, args, data))
        check = _check_results(data)
    best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
    best_cpu = {m: min(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
    extra = {m: max(r["extra_bytes"] for r in rs) for m, rs in runs.items()}
    gallery_bytes = runs["ours"][0]["gallery_bytes"]
    import faiss
    import torch

    summary = {
        "config": {k: getattr(args, k) for k in ("n", "q", "dim", "k", "threads", "query_chunk", "gallery_chunk",
                                                 "repeats")},
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "python": platform.python_version()},
        "cpu": _cpu_name(), "cores": os.cpu_count(),
        "seconds": {m: [round(r["seconds"], 3) for r in rs] for m, rs in runs.items()},
        "cpu_seconds": {m: [round(r["cpu_seconds"], 3) for r in rs] for m, rs in runs.items()},
        "best_seconds": {m: round(s, 3) for m, s in best.items()},
        "time_ratio_ours_over_faiss": round(best["ours"] / best["faiss"], 3),
        "cpu_time_ratio_ours_over_faiss": round(best_cpu["ours"] / best_cpu["faiss"], 3),
        "load_average_before": load_before,
        "peak_extra_bytes": extra,
        "gallery_bytes": gallery_bytes,
        "peak_extra_over_gallery": {m: round(e / gallery_bytes, 3) for m, e in extra.items()},
        "check": check,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
