"""Reference programs the benchmark suites run in fresh processes (`python -m bench.references.NAME`)."""
