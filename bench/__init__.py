"""lora-rag benchmarks: `python bench/run.py --help`, `python bench/load.py --help`."""
