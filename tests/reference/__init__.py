"""References shared by tests (and benchmarks): the originals' own spellings and code paths, re-expressed."""
