"""`make bench`: every benchmark in turn with its default arguments (figures: benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("ranking_vs_faiss", "shards_vs_files", "combiner_cache", "lincir_step", "masking_processes",
              "feature_cache_growth", "resume_latency", "eval_ddp",
              "pic2word_step", "text_padding", "clip_step", "clip_loader", "batched_transforms")


def main() -> None:
    for name in BENCHMARKS:
        print(f"== python -m benchmarks.{name}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True)


if __name__ == "__main__":
    main()
