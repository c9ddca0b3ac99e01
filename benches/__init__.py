"""pypop benchmark suite: ``python -m benches`` (see benches/README.md)."""
