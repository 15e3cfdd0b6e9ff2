"""One KernelWiki index per test session, built from the shipped pages in a temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def wiki_index(tmp_path_factory):
    pytest.importorskip("chromadb")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("bm25s")
    from kda.kernelwiki.index import WikiIndex

    return WikiIndex(tmp_path_factory.mktemp("wiki_eval") / "index")
