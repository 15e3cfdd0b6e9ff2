"""A candidate: a directory under work/ with its sources and a `candidate.toml`.

`candidate.toml` carries flashinfer-bench BuildSpec fields (`language`, `entry_point` as
`file::func`, `destination_passing_style`, optional `name`, `target_hardware`,
`dependencies`, `binding`, `description`) plus an optional `[compile]` table read by the
compile tool, so a candidate packs to a `solution.json` one to one.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadInput, PathRefused
from .store import canonical_json
from .workspace import Workspace

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SOURCE_SUFFIXES = {".py", ".cu", ".cuh", ".cpp", ".cc", ".c", ".h", ".hpp", ".txt", ".md", ".json", ".toml"}


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: Literal["python", "triton", "cuda", "cpp"] = Field(description="Implementation language.")
    entry_point: str = Field(description="'file::function', e.g. 'kernel.py::run'.")
    destination_passing_style: bool = Field(
        default=True, description="True: outputs are passed in as the last arguments; False: returned."
    )
    name: Optional[str] = None
    description: Optional[str] = None
    target_hardware: list[str] = Field(default_factory=lambda: ["cuda"])
    dependencies: list[str] = Field(default_factory=list)
    binding: Optional[Literal["tvm-ffi", "torch"]] = None
    compile: dict[str, Any] = Field(default_factory=dict, description="Options for the compile tool.")

    @field_validator("entry_point")
    @classmethod
    def _entry(cls, v: str) -> str:
        if v.count("::") != 1 or not all(v.split("::")):
            raise ValueError(f"entry_point {v!r} must look like 'file.py::function'")
        path = PurePosixPath(v.split("::")[0])
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"entry_point file {str(path)!r} must be a relative path inside the candidate")
        return v

    @property
    def entry_file(self) -> str:
        return self.entry_point.split("::")[0]

    @property
    def entry_symbol(self) -> str:
        return self.entry_point.split("::")[1]


class Candidate(BaseModel):
    path: str  # workspace-relative directory
    spec: CandidateSpec
    sources: dict[str, str]  # relative path -> text
    content_hash: str

    def write_to(self, dest: Path) -> None:
        """Write the sources (as hashed, not as the directory holds them now) under `dest`."""
        for rel, text in self.sources.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    def to_solution(self, definition: str, author: str = "kda-writer") -> dict[str, Any]:
        s = self.spec
        build: dict[str, Any] = {
            "language": s.language,
            "target_hardware": s.target_hardware,
            "entry_point": s.entry_point,
            "dependencies": s.dependencies,
            "destination_passing_style": s.destination_passing_style,
        }
        if s.binding:
            build["binding"] = s.binding
        return {
            "name": s.name or PurePosixPath(self.path).name,
            "definition": definition,
            "author": author,
            "spec": build,
            "sources": [{"path": p, "content": c} for p, c in sorted(self.sources.items())],
            "description": s.description,
        }


def load_candidate(ws: Workspace, rel_dir: str) -> Candidate:
    """Read and check a candidate directory; nothing is written."""
    directory = ws.resolve(rel_dir)
    rel = ws.rel(directory)
    if not (rel == "work" or rel.startswith("work/")) or rel == "work":
        raise PathRefused(f"candidate {rel_dir!r} must be a directory under work/ (e.g. work/v1)")
    if not directory.is_dir():
        raise BadInput(f"candidate directory {rel} does not exist")
    toml_path = directory / "candidate.toml"
    if not toml_path.is_file():
        raise BadInput(f"{rel}/candidate.toml is missing; it names language and entry_point")
    try:
        spec = CandidateSpec.model_validate(tomllib.loads(toml_path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{rel}/candidate.toml is not valid TOML: {e}") from None
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise BadInput(f"{rel}/candidate.toml: {msg}") from None

    limits = ws.policy.candidate
    sources: dict[str, str] = {}
    total = 0
    for p in sorted(directory.rglob("*")):
        if p.is_dir() or "__pycache__" in p.parts or p.name == "candidate.toml":
            continue
        frel = p.relative_to(directory).as_posix()
        if p.is_symlink():
            raise BadInput(f"{rel}/{frel} is a symlink; candidates hold plain files only")
        if p.suffix not in SOURCE_SUFFIXES:
            raise BadInput(f"{rel}/{frel}: file type {p.suffix or '(none)'} is not a source file "
                           f"({', '.join(sorted(SOURCE_SUFFIXES))})")
        size = p.stat().st_size
        if size > limits.max_file_bytes:
            raise BadInput(f"{rel}/{frel} is {size} bytes; the limit is {limits.max_file_bytes} bytes per file")
        total += size
        if total > limits.max_total_bytes:
            raise BadInput(f"{rel} exceeds {limits.max_total_bytes} bytes of sources in total")
        data = p.read_bytes()
        if b"\x00" in data:
            raise BadInput(f"{rel}/{frel} has binary content (NUL bytes)")
        try:
            sources[frel] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{rel}/{frel} is not UTF-8 text") from None
    if spec.entry_file not in sources:
        raise BadInput(f"{rel}: entry point file {spec.entry_file!r} not found in the candidate")
    digest = hashlib.sha256(_snapshot(spec, sources)).hexdigest()
    return Candidate(path=rel, spec=spec, sources=sources, content_hash=digest)


def _snapshot(spec: CandidateSpec, sources: dict[str, str]) -> bytes:
    """A candidate's whole content as canonical JSON: its sha256 is the candidate's content hash."""
    return canonical_json({"spec": spec.model_dump(), "sources": sorted(sources.items())}).encode()


def record_candidate(ws: Workspace, cand: Candidate) -> str:
    """Keep the candidate's content in the store under its content hash, which becomes an id that
    `candidate=` accepts: the same content even after the directory it came from has changed."""
    ws.store.put_candidate(cand.content_hash, cand.path, _snapshot(cand.spec, cand.sources))
    return cand.content_hash


def recorded_candidate(ws: Workspace, cid: str) -> Candidate:
    """A recorded candidate by its content hash, or a prefix of at least 8 hex digits."""
    key = cid.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise BadInput(f"candidate {cid!r}: a recorded candidate id is the candidate_hash of a benchmark run "
                       "(8 to 64 hex digits; benchmark, show_run and job_status return it), or pass path='work/<dir>'")
    rows = ws.store.find_candidates(key)
    if not rows:
        raise BadInput(f"no recorded candidate {cid!r}: a candidate is recorded when the writer benchmarks it; "
                       "pass path='work/<dir>', or the candidate_hash of a benchmark run")
    if len(rows) > 1:
        raise BadInput(f"candidate id {cid!r} matches more than one recorded candidate; give more digits")
    row = rows[0]
    payload = json.loads(ws.store.get_blob(row["content_hash"]))  # get_blob checks the hash
    try:
        spec = CandidateSpec.model_validate(payload["spec"])
        sources = {str(k): str(v) for k, v in payload["sources"]}
    except (KeyError, TypeError, ValueError, ValidationError) as e:
        raise BadInput(f"recorded candidate {row['content_hash'][:12]} is unreadable: {e}") from None
    if hashlib.sha256(_snapshot(spec, sources)).hexdigest() != row["content_hash"]:
        # A snapshot written by a version of kda whose candidate.toml fields differed from this one's.
        raise BadInput(f"recorded candidate {row['content_hash'][:12]} no longer hashes to its id under this "
                       f"version of kda; benchmark it again by path ({row['path']})")
    return Candidate(path=row["path"], spec=spec, sources=sources, content_hash=row["content_hash"])


def resolve_candidate(ws: Workspace, path: Optional[str], candidate: Optional[str]) -> Candidate:
    """The candidate a tool call names: `path` (a directory under work/, read now) or `candidate`
    (a recorded id: the content as it was when it was benchmarked)."""
    if bool(path) == bool(candidate):
        raise BadInput("give exactly one of `path` (a candidate directory under work/) or `candidate` (an id)")
    if candidate and not candidate.startswith("work/"):
        return recorded_candidate(ws, candidate)
    return load_candidate(ws, path or candidate)  # type: ignore[arg-type]
