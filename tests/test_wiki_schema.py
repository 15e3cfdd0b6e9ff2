"""Every KernelWiki page carries valid front matter; the schema refuses bad pages by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kda.kernelwiki import PAGES_DIR
from kda.kernelwiki.schema import PageMeta, chunk_page, load_pages, page_sections, parse_page
from kda.tools.errors import BadInput
from kda.tools.symptoms import BOTTLENECKS, SYMPTOMS

PAGE_FILES = sorted(PAGES_DIR.glob("*.md"))
REQUIRED = ("id", "title", "type", "architectures", "tags", "symptoms", "techniques", "confidence", "sources",
            "related")


def test_at_least_60_pages():
    assert len(PAGE_FILES) >= 60, f"only {len(PAGE_FILES)} pages in {PAGES_DIR}"


@pytest.mark.parametrize("path", PAGE_FILES, ids=[p.stem for p in PAGE_FILES])
def test_page_front_matter(path: Path):
    page = parse_page(path)  # raises BadInput naming the field on any schema problem
    raw = yaml.safe_load(path.read_text().split("---", 2)[1])
    missing = [k for k in REQUIRED if k not in raw]
    assert not missing, f"{path.name}: front matter lacks {missing}"
    assert set(page.meta.symptoms) <= SYMPTOMS
    if page.meta.type == "playbook" and not page.id.startswith(("measurement-", "reward-")):
        assert page.meta.symptoms, f"{path.name}: a playbook must list the symptoms it treats"
    # search chunks pages by heading: a page needs a title and sections that stand on their own
    sections = {p[0] for p, _ in page_sections(page) if p}
    assert len(sections) >= 3, f"{path.name}: only {len(sections)} '##' sections"
    assert all(c.text.strip() for c in chunk_page(page))


def test_related_ids_exist_and_ids_are_unique():
    pages = load_pages(check_related=True)  # raises naming the page and the missing id
    ids = [p.id for p in pages]
    assert len(ids) == len(set(ids))
    for p in pages:
        assert p.id not in p.meta.related, f"{p.id} lists itself as related"


def test_every_bottleneck_has_a_playbook():
    pages = load_pages(check_related=False)
    missing = [b for b in BOTTLENECKS if not any(b in p.meta.symptoms and p.meta.type == "playbook" for p in pages)]
    assert not missing, f"no playbook page treats {missing}"


GOOD = {
    "id": "demo-page", "title": "A demo page", "type": "technique", "architectures": ["sm90"], "tags": ["demo"],
    "symptoms": ["stall_barrier"], "techniques": [], "confidence": "inferred", "sources": ["own reasoning"],
    "related": [],
}


def _write(tmp_path: Path, meta: dict, name: str = "demo-page") -> Path:
    p = tmp_path / f"{name}.md"
    p.write_text("---\n" + yaml.safe_dump(meta) + "---\n# A demo page\n\nIntro.\n\n## One\n\nText.\n")
    return p


def test_good_page_parses(tmp_path):
    page = parse_page(_write(tmp_path, GOOD))
    assert page.meta == PageMeta.model_validate(GOOD)
    chunks = chunk_page(page)
    assert [c.heading_path for c in chunks] == [(), ("One",)]
    assert chunks[1].symptoms == ("stall_barrier",) and chunks[1].source == "kernelwiki"


@pytest.mark.parametrize("change, needle", [
    ({"type": "tutorial"}, "type"),
    ({"architectures": ["sm70"]}, "architectures"),
    ({"symptoms": ["slow_kernel"]}, "unknown symptom"),
    ({"confidence": "sure"}, "confidence"),
    ({"colour": "red"}, "colour"),
    ({"id": "Demo Page"}, "id"),
    ({"sources": []}, "sources"),
])
def test_bad_front_matter_is_named(tmp_path, change, needle):
    with pytest.raises(BadInput, match=needle):
        parse_page(_write(tmp_path, {**GOOD, **change}))


def test_missing_field_and_bad_files(tmp_path):
    meta = dict(GOOD)
    del meta["confidence"]
    with pytest.raises(BadInput, match="confidence"):
        parse_page(_write(tmp_path, meta))
    with pytest.raises(BadInput, match="differs from the file name"):
        parse_page(_write(tmp_path, GOOD, name="other-name"))
    (tmp_path / "nofm.md").write_text("# no front matter\n")
    with pytest.raises(BadInput, match="front matter"):
        parse_page(tmp_path / "nofm.md")


def test_unknown_related_id_is_refused(tmp_path):
    _write(tmp_path, {**GOOD, "related": ["no-such-page"]})
    with pytest.raises(BadInput, match="no-such-page"):
        load_pages(tmp_path)
