"""Checkpoint layouts of every peer (one table of key rules) and loading, exporting, saving."""
