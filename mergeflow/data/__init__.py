"""Real datasets for demos and tests, read from files that ship inside PyPI wheels."""
