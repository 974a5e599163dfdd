"""Command-line binaries, one per pipeline stage."""
