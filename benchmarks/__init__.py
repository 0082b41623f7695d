"""mergeline's benchmark: `make bench` (python -m benchmarks.run). Not part of the installed package."""
