"""Tests for analysis/job/plan.py that need no run folder (the checks on runs: tests/analysis_job/test_sindy_job.py)."""

from __future__ import annotations

from analysis.job.plan import estimate_memory


def test_memory_estimate():
    est = estimate_memory(10**6, 16)
    assert est.n_terms == 1035
    assert est.gram_bytes == (1035**2 + 1035 * 16 + 16 * 16 + 16) * 8
    assert est.chunk_bytes == 65536 * 1035 * 8
    assert estimate_memory(1000, 16, chunk_size=65536).chunk_bytes == 1000 * 1035 * 8  # never more rows than there are
