"""wiki_search and wiki_read: the KernelWiki pages (and the user's ingested sources)."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, Field

from .toolkit import CallContext, Reply, tool


class WikiSearchInput(BaseModel):
    query: str = Field(description="What you are looking for, in words or straight from a profile summary, e.g. "
                                   "'stall_long_scoreboard 72% at kernel.cu:88 in a paged gather'.")
    k: int = Field(5, ge=1, le=50, description="How many hits to return (pages count once; best section shown).")
    filters: Optional[dict[str, Union[str, list[str]]]] = Field(
        None, description="Narrow the search; keys: type (hardware, technique, pattern, kernel, language, playbook, "
                          "migration), architecture (sm80, sm89, sm90, sm100, sm120), tags, symptom (a bottleneck or "
                          "stall name from profile_summary), source ('kernelwiki' or an ingested source name). A list "
                          "means any of its values; keys combine with AND.")


class WikiHit(BaseModel):
    page_id: str = Field(description="Pass to wiki_read.")
    title: str
    heading_path: list[str] = Field(description="The section that matched, below the title ([] = introduction).")
    snippet: str
    score: float = Field(description="Reciprocal-rank fusion of keyword and semantic ranks; higher is better.")
    sources: list[str] = Field(description="What the page's facts come from.")
    source: str = Field(description="'kernelwiki' or the ingested source the hit comes from.")
    kind: str = Field(description="page, doc or code")
    type: str
    also: list[str] = Field(description="Other matching sections of the same page.")


class WikiSearchOutput(BaseModel):
    query: str
    hits: list[WikiHit]
    notes: list[str]
    filters: dict[str, list[str]]
    candidates: int = Field(description="Chunks that passed the filters.")


@tool("wiki_search", title="Search KernelWiki", input_model=WikiSearchInput, output_model=WikiSearchOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def wiki_search(call: CallContext, args: WikiSearchInput) -> Reply[WikiSearchOutput]:
    """Search the kernel-engineering wiki (hardware features, techniques, kernels, Triton/CUDA,
    profiling playbooks per bottleneck and stall reason, measurement pitfalls) and any sources
    the user ingested. Hybrid keyword + semantic search; paste a profile symptom or describe the
    problem. Read a hit in full with wiki_read(page_id)."""
    from kda.tools import wiki

    res = wiki.search(call.ws, args.query, args.k, args.filters)
    hits = [WikiHit(page_id=h.page_id, title=h.title, heading_path=h.heading_path, snippet=h.snippet, score=h.score,
                    sources=h.sources, source=h.source, kind=h.kind, type=h.type, also=h.also) for h in res.hits]
    out = WikiSearchOutput(query=res.query, hits=hits, notes=res.notes, filters=res.filters, candidates=res.candidates)
    shown = res.query if len(res.query) <= 60 else res.query[:57] + "..."
    if hits:
        top = hits[0]
        where = " > ".join(top.heading_path) or "introduction"
        head = f"{len(hits)} hit(s) for {shown!r}; top: {top.page_id} ({where})"
    else:
        head = f"no hits for {shown!r}"
    if res.notes:
        head += "; " + "; ".join(res.notes)
    lines = []
    for n, h in enumerate(hits, 1):
        where = " > ".join(h.heading_path) or "introduction"
        lines.append(f"{n}. {h.page_id} — {h.title} [{where}] score {h.score:.4f}\n   {h.snippet}")
    return Reply(head, out, "\n".join(lines))


class WikiReadInput(BaseModel):
    page_id: str = Field(description="A page id from a wiki_search hit, e.g. 'stall-long-scoreboard'.")
    section: Optional[str] = Field(None, description="Only this section (a heading, or part of one).")
    offset: int = Field(0, ge=0, description="Character offset to start from (use next_offset to continue).")
    limit: int = Field(8000, ge=200, le=30000, description="Most characters to return.")


class WikiReadOutput(BaseModel):
    page_id: str
    title: str
    source: str
    kind: str
    section: Optional[str]
    sections: list[str]
    text: str
    offset: int
    next_offset: Optional[int]
    total_chars: int
    meta: dict[str, Any] = Field(description="The page's front matter (type, architectures, tags, symptoms, "
                                             "confidence, sources, related); empty for ingested files.")


@tool("wiki_read", title="Read a KernelWiki page", input_model=WikiReadInput, output_model=WikiReadOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def wiki_read(call: CallContext, args: WikiReadInput) -> Reply[WikiReadOutput]:
    """Read a wiki page (or one section of it, or an ingested file) in full, paginated by
    characters. The front matter lists related pages worth reading next."""
    from kda.tools import wiki

    r = wiki.read(call.ws, args.page_id, args.section, args.offset, args.limit)
    out = WikiReadOutput(page_id=r.page_id, title=r.title, source=r.source, kind=r.kind, section=r.section,
                         sections=r.sections, text=r.text, offset=r.offset, next_offset=r.next_offset,
                         total_chars=r.total_chars, meta=r.meta)
    span = f"chars {r.offset}-{r.offset + len(r.text)} of {r.total_chars}"
    more = f"; more from offset {r.next_offset}" if r.next_offset is not None else ""
    part = f" section {r.section!r}" if r.section else ""
    head = f"{r.page_id}: {r.title}{part} ({span}{more})"
    related = r.meta.get("related") if r.meta else None
    tail = f"\n\nrelated: {', '.join(related)}" if related and r.next_offset is None else ""
    return Reply(head, out, r.text + tail)
