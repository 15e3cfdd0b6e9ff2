"""KernelWiki: kernel-engineering pages written for this project, and the hybrid search over them.

`schema` parses and chunks the pages, `index` holds the BM25 + dense index, `ingest` adds a
user's own sources beside the pages, and `keyword_baseline` is the keyword-only scorer the
evaluation compares against. Nothing heavy is imported here: the server imports this package
at start-up and the embedding model loads on the first search.
"""

from pathlib import Path

PAGES_DIR = Path(__file__).resolve().parent / "pages"
