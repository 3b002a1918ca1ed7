"""`make bench`: benchmark suites (`python -m bench.run`) and their reference programs (bench/references/)."""
