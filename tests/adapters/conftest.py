import pytest

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(kind, **kw)`` -> folder of a tiny random diffusers pipeline, built once per module."""
    from scoredistill.adapters.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny_pipes")
    cache = {}

    def get(kind, **kw):
        key = (kind, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = save_tiny(kind, str(root / f"{kind}_{len(cache)}"), **kw)
        return cache[key]

    return get
