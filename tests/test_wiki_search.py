"""KernelWiki search, read, ingest, incremental updates, bad input and recovery, and the MCP tools."""

from __future__ import annotations

import shutil
import sqlite3
import warnings
from pathlib import Path

import pytest

pytest.importorskip("chromadb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("bm25s")

from conftest import mcp_client  # noqa: E402
from kda.kernelwiki import PAGES_DIR  # noqa: E402
from kda.kernelwiki.index import Embedder, WikiIndex, WikiWarning, tokenize  # noqa: E402
from kda.kernelwiki.ingest import chunk_file, cpp_defs, ingest_path  # noqa: E402
from kda.kernelwiki.schema import load_pages  # noqa: E402
from kda.tools import wiki as wiki_glue  # noqa: E402
from kda.tools.errors import BadInput  # noqa: E402

SMALL_PAGES = ["stall-long-scoreboard", "paged-kv-cache", "hopper-wgmma", "smem-bank-conflicts-swizzle",
               "cuda-graphs-launch-overhead"]


@pytest.fixture(scope="module")
def full_index(tmp_path_factory) -> WikiIndex:
    return WikiIndex(tmp_path_factory.mktemp("wiki") / "index")


def _small_pages(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for pid in SMALL_PAGES:
        shutil.copy(PAGES_DIR / f"{pid}.md", dest / f"{pid}.md")
    return dest


@pytest.fixture
def small_index(tmp_path) -> WikiIndex:
    return WikiIndex(tmp_path / "index", _small_pages(tmp_path / "pages"))


# --- search -------------------------------------------------------------------------------------
def test_symptom_query_finds_playbook(full_index):
    res = full_index.search("stall_long_scoreboard 72% at kernel.cu:88 in a paged gather", 5)
    ids = [h.page_id for h in res.hits]
    assert "stall-long-scoreboard" in ids[:3], ids
    h = res.hits[0]
    assert h.title and h.snippet and h.score > 0 and h.sources and h.kind == "page"
    assert ids == list(dict.fromkeys(ids)), "a page appears once"
    assert res.candidates == full_index.chunk_count


def test_filters_restrict_every_hit(full_index):
    pages = {p.id: p.meta for p in load_pages(check_related=False)}
    res = full_index.search("shared memory bank conflicts", 10, {"type": "playbook"})
    assert res.hits and all(pages[h.page_id].type == "playbook" for h in res.hits)
    res = full_index.search("tensor core matrix multiply", 10, {"architecture": "sm100"})
    assert res.hits and all("sm100" in pages[h.page_id].architectures for h in res.hits)
    res = full_index.search("waiting on loads", 10, {"symptom": "stall_long_scoreboard", "type": ["playbook", "kernel"]})
    assert res.hits and all("stall_long_scoreboard" in pages[h.page_id].symptoms and
                            pages[h.page_id].type in ("playbook", "kernel") for h in res.hits)
    res = full_index.search("pipelining", 10, {"tags": ["hopper"]})
    assert res.hits and all("hopper" in [t.lower() for t in pages[h.page_id].tags] for h in res.hits)
    res = full_index.search("attention", 5, {"source": "kernelwiki"})
    assert res.hits and all(h.source == "kernelwiki" for h in res.hits)
    assert res.filters == {"source": ["kernelwiki"]}


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_is_refused(full_index, query):
    with pytest.raises(BadInput, match="query is empty"):
        full_index.search(query, 5)


def test_huge_query_is_truncated_with_a_note(full_index):
    q = "long scoreboard stalls in a paged gather " * 2600  # ~100 KB
    assert len(q) > 100_000
    res = full_index.search(q, 5)
    assert any("truncated" in n for n in res.notes)
    assert len(res.query) <= 2000 and res.hits


def test_a_query_with_no_word_in_the_wiki_says_its_hits_may_be_weak(full_index):
    weak = full_index.search("qwzxvkj plorbtang", 3)
    assert weak.hits and any("nearest by meaning" in n for n in weak.notes), weak.notes
    strong = full_index.search("long scoreboard stalls in a paged gather", 3)
    assert not any("nearest by meaning" in n for n in strong.notes), strong.notes
    filtered = full_index.search("qwzxvkj plorbtang", 3, {"type": "pattern"})
    assert any("the pages these filters keep" in n for n in filtered.notes), filtered.notes


@pytest.mark.parametrize("filters, needle", [
    ({"colour": "red"}, "unknown filter 'colour'"),
    ({"type": "tutorial"}, "unknown type 'tutorial'"),
    ({"architecture": "sm70"}, "unknown architecture 'sm70'"),
    ({"symptom": "slow"}, "unknown symptom 'slow'"),
    ({"source": "nowhere"}, "unknown source 'nowhere'"),
    ({"tags": ["no-such-tag-xyz"]}, "unknown tags"),
    ({"type": 3}, "takes a string or a list"),
])
def test_bad_filters_are_named(full_index, filters, needle):
    with pytest.raises(BadInput, match=needle):
        full_index.search("anything", 5, filters)


def test_bad_k(full_index):
    for k in (0, 51):
        with pytest.raises(BadInput, match="k must be"):
            full_index.search("gemm", k)


def test_tokenizer_meets_both_spellings():
    toks = tokenize("stall_long_scoreboard at kernel.cu:88; cudaGraphLaunch, num_warps")
    assert {"stall_long_scoreboard", "stall", "long", "scoreboard", "cuda", "graph", "launch", "num_warps"} <= set(toks)
    assert tokenize("stalls") == tokenize("stall")


# --- read ---------------------------------------------------------------------------------------
def test_read_page_section_and_pages(full_index):
    r = full_index.read("hopper-wgmma")
    assert r.title.startswith("Hopper wgmma") and r.meta["type"] == "hardware" and r.sections
    assert r.next_offset is None and r.total_chars == len(r.text)
    sec = r.sections[1]
    part = full_index.read("hopper-wgmma", sec.lower())
    assert part.section == sec and len(part.text) < r.total_chars
    # pagination: consecutive pages rebuild the whole text
    text, offset = "", 0
    while offset is not None:
        p = full_index.read("hopper-wgmma", None, offset, 500)
        text += p.text
        offset = p.next_offset
    assert text == r.text


def test_read_errors(full_index):
    with pytest.raises(BadInput, match="no wiki page 'hoper-wgmma'.*hopper-wgmma"):
        full_index.read("hoper-wgmma")
    with pytest.raises(BadInput, match="no section"):
        full_index.read("hopper-wgmma", "no such heading anywhere")
    with pytest.raises(BadInput, match="page_id is empty"):
        full_index.read("  ")
    with pytest.raises(BadInput, match="past the end"):
        full_index.read("hopper-wgmma", None, 10**7)


# --- keeping current ----------------------------------------------------------------------------
def _ids(ix: WikiIndex, page: str) -> set[str]:
    return {r["id"] for r in ix._rows if r["page_id"] == page}


def test_only_changed_pages_are_reembedded(tmp_path):
    pages = _small_pages(tmp_path / "pages")
    ix = WikiIndex(tmp_path / "index", pages)
    before = {p: _ids(ix, p) for p in SMALL_PAGES}
    wiki_glue.forget()
    again = WikiIndex(tmp_path / "index", pages)
    assert not any("embedded" in n for n in again.notes), again.notes
    target = pages / "hopper-wgmma.md"
    target.write_text(target.read_text() + "\n## Added section\n\nA new note on WARPGROUP.DEPBAR waits.\n")
    (pages / "cuda-graphs-launch-overhead.md").unlink()
    changed = WikiIndex(tmp_path / "index", pages)
    assert "pages: 1 (re)embedded, 1 removed" in changed.notes
    assert _ids(changed, "hopper-wgmma") != before["hopper-wgmma"]
    for p in ("stall-long-scoreboard", "paged-kv-cache", "smem-bank-conflicts-swizzle"):
        assert _ids(changed, p) == before[p]
    assert not _ids(changed, "cuda-graphs-launch-overhead")
    assert changed._collection.count() == changed.chunk_count
    hit = changed.search("WARPGROUP.DEPBAR waits added section", 3).hits[0]
    assert hit.page_id == "hopper-wgmma" and hit.heading_path == ["Added section"]


# --- ingest -------------------------------------------------------------------------------------
CU = """#include <cuda_runtime.h>

// Reduce a row with warp shuffles: each lane folds its neighbour's partial sum
// until lane 0 holds the total. Assumes blockDim.x == 32.
__device__ float warp_sum_zebra(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

namespace demo {
/* Scale a vector in place; "}" in a string must not end the function. */
__global__ void scale_kernel(float* x, float a, int n) {
  const char* s = "}";
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { x[i] *= a; }
}
}  // namespace demo
"""

PY = '''import math


# Gate tokens to experts; keeps the top two.
def route_tokens_quokka(logits, k=2):
    return sorted(range(len(logits)), key=lambda i: -logits[i])[:k]


class Scheduler:
    """Hands out tiles in a persistent loop."""

    def next_tile(self):
        return 0
'''

RST = """Tuning notes
============

Intro text about the notes.

Occupancy
---------

Use fewer registers per thread to fit more warps: the marmot heuristic.
"""


def _tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "kern.cu").write_text(CU)
    (root / "src" / "route.py").write_text(PY)
    (root / "notes.rst").write_text(RST)
    (root / "README.md").write_text("# My kernels\n\n## Build\n\nRun make with the wombat flag.\n")
    (root / "blob.bin").write_bytes(b"\x00\x01")
    return root


def test_cpp_scanner_finds_definitions_with_comments():
    spans = cpp_defs(CU)
    names = [p for p, _, _ in spans]
    assert ("warp_sum_zebra",) in names and ("namespace demo", "scale_kernel") in names
    chunks = chunk_file("s", "k.cu", CU)
    zebra = next(c for c in chunks if c.heading_path == ("warp_sum_zebra",))
    assert zebra.text.startswith("// Reduce a row") and zebra.text.rstrip().endswith("}")
    scale = next(c for c in chunks if c.heading_path == ("namespace demo", "scale_kernel"))
    assert 'const char* s = "}";' in scale.text and "if (i < n)" in scale.text
    py = chunk_file("s", "r.py", PY)
    route = next(c for c in py if c.heading_path == ("route_tokens_quokka",))
    assert route.text.startswith("# Gate tokens") and route.kind == "code"
    assert any(c.heading_path == ("class Scheduler",) for c in py)
    rst = chunk_file("s", "n.rst", RST)
    assert [c.heading_path for c in rst] == [("Tuning notes",), ("Tuning notes", "Occupancy")]


def test_ingest_search_update_remove(small_index, tmp_path):
    root = _tree(tmp_path / "mykernels")
    rep = ingest_path(small_index, root, "mine")
    assert rep.files_updated == 4 and rep.chunks_added >= 6
    names = {s["name"]: s for s in small_index.sources()}
    assert names["mine"]["files"] == 4 and "kernelwiki" in names
    hit = small_index.search("warp shuffle row sum zebra", 3, {"source": "mine"}).hits[0]
    assert hit.page_id == "mine:src/kern.cu" and hit.heading_path == ["warp_sum_zebra"] and hit.kind == "code"
    assert small_index.search("marmot heuristic registers", 1, mode="bm25").hits[0].page_id == "mine:notes.rst"
    assert "mine:notes.rst" in [h.page_id for h in small_index.search("marmot heuristic registers", 3).hits]
    read = small_index.read("mine:src/route.py", "route_tokens_quokka")
    assert "def route_tokens_quokka" in read.text
    # unchanged: nothing re-embedded
    again = ingest_path(small_index, root, "mine")
    assert again.files_unchanged == 4 and again.files_updated == 0 and again.chunks_added == 0
    # one file changed, one removed
    (root / "README.md").write_text("# My kernels\n\n## Build\n\nRun make with the platypus flag.\n")
    (root / "notes.rst").unlink()
    upd = ingest_path(small_index, root, "mine")
    assert (upd.files_updated, upd.files_removed, upd.files_unchanged) == (1, 1, 2)
    assert small_index.search("platypus flag", 1, {"source": "mine"}).hits[0].page_id == "mine:README.md"
    with pytest.raises(BadInput, match="no wiki page"):
        small_index.read("mine:notes.rst")
    assert small_index._collection.count() == small_index.chunk_count
    # remove the source
    n = small_index.remove_source("mine")
    assert n > 0 and "mine" not in {s["name"] for s in small_index.sources()}
    assert all(r["source"] == "kernelwiki" for r in small_index._rows)
    assert small_index._collection.count() == small_index.chunk_count


def test_ingest_bad_input(small_index, tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        ingest_path(small_index, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.md").write_text("  \n")
    (empty / "y.png").write_bytes(b"\x89PNG")
    with pytest.raises(BadInput, match="holds no text"):
        ingest_path(small_index, empty)
    with pytest.raises(BadInput, match="built-in pages"):
        ingest_path(small_index, _tree(tmp_path / "t1"), "kernelwiki")
    ingest_path(small_index, tmp_path / "t1", "dup")
    with pytest.raises(BadInput, match="already indexed"):
        ingest_path(small_index, _tree(tmp_path / "t2"), "dup")
    with pytest.raises(BadInput, match="no ingested source"):
        small_index.remove_source("never-added")
    assert {s["name"] for s in small_index.sources()} == {"kernelwiki", "dup"}


def test_failed_ingest_leaves_nothing_half_indexed(small_index, tmp_path, monkeypatch):
    root = _tree(tmp_path / "src")
    before_rows = small_index.chunk_count
    before_vectors = small_index._collection.count()
    calls = {"n": 0}
    real = Embedder.encode

    def flaky(self, texts):
        calls["n"] += 1
        raise RuntimeError("embedding died mid-ingest")

    monkeypatch.setattr(Embedder, "encode", flaky)
    with pytest.raises(RuntimeError, match="mid-ingest"):
        ingest_path(small_index, root, "flaky")
    monkeypatch.setattr(Embedder, "encode", real)
    assert calls["n"] >= 1
    assert "flaky" not in {s["name"] for s in small_index.sources()}
    assert small_index.file_hashes("flaky") == {}
    assert small_index.chunk_count == before_rows and small_index._collection.count() == before_vectors
    rep = ingest_path(small_index, root, "flaky")  # a retry indexes everything
    assert rep.files_updated == 4


def test_corrupt_embeddings_are_rebuilt_with_a_warning(small_index, tmp_path):
    root = _tree(tmp_path / "src")
    ingest_path(small_index, root, "mine")
    path, n = small_index.path, small_index.chunk_count
    small_index.close()
    (path / "chroma" / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.warns(WikiWarning, match="re-embedding all chunks"):
        ix = WikiIndex(path, small_index.pages_dir)
    assert ix.chunk_count == n and ix._collection.count() == n
    assert ix.search("warp shuffle row sum zebra", 1, {"source": "mine"}).hits[0].page_id == "mine:src/kern.cu"


def test_corrupt_catalog_is_rebuilt_and_sources_reingested(small_index, tmp_path):
    root = _tree(tmp_path / "src")
    ingest_path(small_index, root, "mine")
    path, n = small_index.path, small_index.chunk_count
    small_index.close()
    for suffix in ("", "-wal", "-shm"):
        p = path / f"catalog.db{suffix}"
        if p.exists():
            p.unlink()
    (path / "catalog.db").write_bytes(b"garbage" * 500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ix = WikiIndex(path, small_index.pages_dir)
    assert any(issubclass(w.category, WikiWarning) and "rebuilding" in str(w.message) for w in caught)
    assert ix.chunk_count == n and "mine" in {s["name"] for s in ix.sources()}
    with sqlite3.connect(path / "catalog.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --- the MCP tools ------------------------------------------------------------------------------
@pytest.fixture
def wiki_env(full_index, monkeypatch):
    monkeypatch.setenv("KDA_WIKI_INDEX", str(full_index.path))
    wiki_glue._OPEN[full_index.path] = full_index
    yield full_index
    wiki_glue.forget(full_index.path)


@pytest.mark.anyio
@pytest.mark.parametrize("role", ["writer", "reviewer"])
async def test_mcp_wiki_search_and_read(workspace, wiki_env, role):
    async with mcp_client(workspace, role) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert {"wiki_search", "wiki_read"} <= set(tools)
        assert tools["wiki_search"].annotations.read_only_hint is True
        props = tools["wiki_search"].input_schema["properties"]
        assert {"query", "k", "filters"} <= set(props)
        assert {"page_id", "section"} <= set(tools["wiki_read"].input_schema["properties"])
        r = await c.call_tool("wiki_search", {"query": "stall_long_scoreboard 72% at kernel.cu:88 in a paged gather",
                                              "k": 3, "filters": {"type": "playbook"}})
        assert not r.is_error, r.content[0].text
        first = r.content[0].text.splitlines()[0]
        assert first.startswith("3 hit(s)") and "stall-long-scoreboard" in r.content[0].text
        hit = r.structured_content["hits"][0]
        assert {"page_id", "title", "heading_path", "snippet", "score", "sources"} <= set(hit)
        r = await c.call_tool("wiki_read", {"page_id": hit["page_id"], "limit": 1000})
        assert not r.is_error and r.structured_content["next_offset"] is not None
        assert len(r.structured_content["text"]) <= 1000
        assert r.content[0].text.splitlines()[0].startswith(hit["page_id"] + ":")
        bad = await c.call_tool("wiki_search", {"query": "  "})
        assert bad.is_error and "query is empty" in bad.content[0].text
        bad = await c.call_tool("wiki_search", {"query": "x", "filters": {"colour": "red"}})
        assert bad.is_error and "unknown filter" in bad.content[0].text
        bad = await c.call_tool("wiki_read", {"page_id": "no-such-page"})
        assert bad.is_error and "no wiki page" in bad.content[0].text
