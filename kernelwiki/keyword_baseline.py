"""The keyword-only scorer of the public KernelWiki scheme: the baseline the evaluation beats.

Per query term (after an alias table widens abbreviations): +10 when the page title contains
it, +5 when a tag matches it, and +1 per body occurrence up to +3. Pages rank by the sum.
No stemming, no embeddings: exactly the kind of lookup an agent would otherwise grep for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .schema import Page

# Abbreviations and synonyms an agent types, mapped to the words the pages use.
ALIASES: dict[str, list[str]] = {
    "smem": ["shared memory", "shared"],
    "gmem": ["global memory"],
    "tma": ["tensor memory accelerator", "tma"],
    "wgmma": ["warpgroup", "wgmma"],
    "mma": ["tensor core", "mma"],
    "tc": ["tensor core"],
    "tensor-cores": ["tensor core"],
    "hbm": ["dram", "bandwidth"],
    "dram": ["dram", "bandwidth"],
    "bw": ["bandwidth"],
    "fa": ["flash attention"],
    "fa2": ["flash attention"],
    "fa3": ["flash attention"],
    "flashattention": ["flash attention"],
    "kv": ["kv cache"],
    "moe": ["mixture of experts", "moe"],
    "gemm": ["gemm", "matmul"],
    "matmul": ["gemm", "matmul"],
    "spill": ["spills", "local memory"],
    "spills": ["spills", "local memory"],
    "lmem": ["local memory"],
    "occupancy": ["occupancy"],
    "regs": ["registers"],
    "h100": ["hopper", "sm90"],
    "hopper": ["hopper", "sm90"],
    "a100": ["ampere", "sm80"],
    "ampere": ["ampere", "sm80"],
    "b200": ["blackwell", "sm100"],
    "blackwell": ["blackwell", "sm100"],
    "fp8": ["fp8", "e4m3"],
    "fp4": ["fp4", "nvfp4", "mxfp4"],
    "softmax": ["softmax"],
    "layernorm": ["layernorm", "norm"],
    "rmsnorm": ["rmsnorm", "norm"],
    "topk": ["top-k", "topk"],
    "argmax": ["top-k"],
    "graphs": ["cuda graphs"],
    "launch": ["launch overhead", "launch"],
    "ncu": ["nsight compute"],
    "sync": ["barrier", "__syncthreads"],
    "syncthreads": ["barrier", "__syncthreads"],
    "coalesced": ["coalescing"],
    "uncoalesced": ["coalescing", "uncoalesced"],
    "bank": ["bank conflicts"],
    "conflicts": ["bank conflicts"],
    "swizzle": ["swizzle"],
    "splitk": ["split-k"],
    "streamk": ["stream-k"],
    "persistent": ["persistent"],
    "autotune": ["autotune", "autotuning"],
    "num_warps": ["num_warps"],
    "num_stages": ["num_stages"],
    "pipeline": ["pipeline", "pipelining"],
    "cp.async": ["cp.async"],
    "ldmatrix": ["ldmatrix"],
    "mbarrier": ["mbarrier"],
    "tmem": ["tensor memory", "tmem"],
    "tcgen05": ["tcgen05"],
    "dsmem": ["distributed shared memory", "cluster"],
    "atomics": ["atomic"],
    "atomicadd": ["atomic"],
    "scan": ["scan", "prefix sum"],
    "cumsum": ["scan", "prefix sum"],
    "reduction": ["reduction", "reduce"],
    "decode": ["decode", "split-kv"],
    "paged": ["paged"],
    "l2": ["l2"],
    "benchmark": ["benchmark", "timing"],
    "timing": ["timing", "benchmark"],
    "cheat": ["reward hack"],
}

STOP = frozenset(
    "a an and are as at be by do does for from how i in into is it of on or the this to what when why with my "
    "we our can should would which it's its that there their not no very".split()
)


@dataclass(frozen=True)
class ScoredPage:
    page_id: str
    score: float


def query_terms(query: str) -> list[str]:
    words = [w for w in re.findall(r"[a-z0-9_.+\-]+", query.lower()) if w not in STOP and len(w) > 1]
    terms: list[str] = []
    for w in words:
        w = w.strip(".-")
        if not w or w.isdigit():
            continue
        terms.append(w)
        terms.extend(ALIASES.get(w, []))
    return list(dict.fromkeys(terms))


def _count(term: str, text: str) -> int:
    return len(re.findall(r"(?<![a-z0-9])" + re.escape(term), text))


def score_page(terms: Iterable[str], page: Page, title: str, tags: list[str], body: str) -> float:
    total = 0.0
    for t in terms:
        if _count(t, title):
            total += 10
        if any(t == tag or t in tag.split("-") or t.replace(" ", "-") == tag for tag in tags):
            total += 5
        total += min(3, _count(t, body))
    return total


class KeywordBaseline:
    """Rank pages for a query with the keyword scheme."""

    def __init__(self, pages: list[Page]):
        self._pages = [(p, p.meta.title.lower(), [t.lower() for t in p.meta.tags], p.body.lower()) for p in pages]

    def search(self, query: str, k: int = 5) -> list[ScoredPage]:
        terms = query_terms(query)
        scored = [ScoredPage(p.id, score_page(terms, p, title, tags, body)) for p, title, tags, body in self._pages]
        scored = [s for s in scored if s.score > 0]
        scored.sort(key=lambda s: (-s.score, s.page_id))
        return scored[:k]
