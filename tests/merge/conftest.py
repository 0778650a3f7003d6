"""Fixtures of the merge tests."""
import pytest


@pytest.fixture(autouse=True)
def isolated_hash_cache(tmp_path, monkeypatch):
    """Every merge test gets its own sha256 cache (never the user's ~/.cache)."""
    monkeypatch.setenv("FASTSOUP_CACHE_DIR", str(tmp_path / ".fastsoup-cache"))
    yield
