"""Retrieval quality: hybrid search vs the keyword-only baseline on the same queries.

recall@5: share of queries with at least one answering page among the first 5 pages.
MRR: mean of 1/rank of the first answering page (0 when none is in the first 10).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

QUERIES = Path(__file__).with_name("queries.yaml")


@pytest.fixture(scope="module")
def wiki_index(tmp_path_factory):
    """One index of the shipped pages, built in a temporary folder (a conftest.py here would
    shadow tests/conftest.py, which other test modules import by name)."""
    pytest.importorskip("chromadb")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("bm25s")
    from kda.kernelwiki.index import WikiIndex

    return WikiIndex(tmp_path_factory.mktemp("wiki_eval") / "index")


def _load_queries() -> list[dict]:
    data = yaml.safe_load(QUERIES.read_text())
    return data["queries"]


def _metrics(ranked: list[list[str]], answers: list[list[str]]) -> dict[str, float]:
    hits5, rr = 0, 0.0
    for got, want in zip(ranked, answers):
        ranks = [i for i, pid in enumerate(got[:10]) if pid in want]
        if ranks and ranks[0] < 5:
            hits5 += 1
        if ranks:
            rr += 1.0 / (ranks[0] + 1)
    n = len(answers)
    return {"recall@5": hits5 / n, "mrr": rr / n}


def test_eval_set_is_valid():
    from kda.kernelwiki.schema import load_pages

    qs = _load_queries()
    ids = {p.id for p in load_pages(check_related=False)}
    assert len(qs) >= 40
    assert len({q["q"] for q in qs}) == len(qs), "duplicate queries"
    for q in qs:
        assert q["answers"], q["q"]
        missing = set(q["answers"]) - ids
        if missing:
            pytest.skip(f"pages not written yet: {sorted(missing)}")


def test_hybrid_beats_keyword_baseline(wiki_index, capsys):
    from kda.kernelwiki.keyword_baseline import KeywordBaseline
    from kda.kernelwiki.schema import load_pages

    qs = _load_queries()
    pages = load_pages(check_related=False)
    ids = {p.id for p in pages}
    if any(set(q["answers"]) - ids for q in qs):
        pytest.skip("some answer pages are not written yet")
    baseline = KeywordBaseline(pages)
    answers = [q["answers"] for q in qs]
    runs: dict[str, list[list[str]]] = {"hybrid": [], "bm25 only": [], "dense only": [], "keyword baseline": []}
    for q in qs:
        for mode, name in (("hybrid", "hybrid"), ("bm25", "bm25 only"), ("dense", "dense only")):
            res = wiki_index.search(q["q"], 10, {"source": "kernelwiki"}, mode=mode)
            runs[name].append([h.page_id for h in res.hits])
        runs["keyword baseline"].append([s.page_id for s in baseline.search(q["q"], 10)])
    table = {name: _metrics(r, answers) for name, r in runs.items()}
    misses = [(q["q"], q["answers"], got[:5]) for q, got in zip(qs, runs["hybrid"]) if not set(got[:5]) & set(q["answers"])]
    with capsys.disabled():
        print(f"\nKernelWiki retrieval on {len(qs)} queries ({len(pages)} pages, {wiki_index.chunk_count} chunks)")
        print(f"{'scorer':<18}{'recall@5':>10}{'MRR':>8}")
        for name, m in table.items():
            print(f"{name:<18}{m['recall@5']:>10.3f}{m['mrr']:>8.3f}")
        for q, want, got in misses:
            print(f"  hybrid miss: {q!r}: want {want}, got {got}")
    hybrid, base = table["hybrid"], table["keyword baseline"]
    assert hybrid["recall@5"] >= 0.9, f"hybrid recall@5 {hybrid['recall@5']:.3f} < 0.9"
    assert hybrid["recall@5"] > base["recall@5"] or (hybrid["recall@5"] == base["recall@5"] and hybrid["mrr"] > base["mrr"]), \
        f"hybrid {hybrid} does not beat the keyword baseline {base}"
    assert hybrid["mrr"] > base["mrr"]
