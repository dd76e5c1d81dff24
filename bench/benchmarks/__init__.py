"""asv benchmarks of ebpf-stream; ``bench/run.py`` runs the same measurements directly."""
