"""Tools beside the tasks: benchmarks, FLOP counts, export and pictures."""
