"""pypop: a POP3 server framework and client for Python, with a Rust wire codec."""

__version__ = "0.1.0"
