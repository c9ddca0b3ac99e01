"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

from hypothesis import strategies as st


def octets(min_size: int = 0, max_size: int = 100) -> st.SearchStrategy[bytes]:
    """``st.binary``, drawn as integers. Hypothesis caches test cases by their choice
    sequences; where a ``bytes`` choice and an ``int`` one can meet at the same place
    (``st.one_of`` a byte string and anything else), comparing a cached ``b""`` with a
    cached ``0`` (equal hashes) raises BytesWarning under ``python -bb``, our setting,
    and fails the test at random."""
    return st.lists(st.integers(0, 255), min_size=min_size, max_size=max_size).map(bytes)
