"""Speed and memory measurements (not run by make test); results in benchmarks/RESULTS.md."""
