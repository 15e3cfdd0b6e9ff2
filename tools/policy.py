"""Policy files (`policies/*.toml`, copied to `<workspace>/policy.toml`): roles, paths, floors.

Parsed strictly: an unknown key or a bad value stops start-up with the key and the file named.
A workspace copy may tighten the shipped floors but never loosen them.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PolicyError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALL_TOOLS = frozenset(
    {
        "task_info", "compile", "benchmark", "show_run", "profile", "profile_summary", "profile_diff",
        "wiki_search", "wiki_read", "record_candidate", "list_candidates", "show_candidate",
        "diff_candidates", "tried_directions", "plan_dispatch", "job_status", "audit_log",
        "audit_verify", "verify",
    }
)
# Tools that only read: the only ones a read-only role may hold.
READ_ONLY_TOOLS = frozenset(
    {
        "task_info", "show_run", "profile_summary", "profile_diff", "wiki_search", "wiki_read",
        "list_candidates", "show_candidate", "diff_candidates", "tried_directions", "audit_log",
        "audit_verify", "verify", "job_status",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RolePolicy(_Strict):
    description: str = ""
    read_only: bool = False
    tools: list[str] = Field(min_length=1)

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - ALL_TOOLS)
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; known: {sorted(ALL_TOOLS)}")
        return v


class PathPolicy(_Strict):
    protected: list[str]
    writable: list[str]


class CorrectnessPolicy(_Strict):
    atol: float = Field(gt=0, le=1.0)
    rtol: float = Field(gt=0, le=1.0)
    required_matched_ratio: float = Field(gt=0, le=1.0)
    min_trials: int = Field(ge=3, le=100)


class AcceptancePolicy(_Strict):
    target_speedup: float = Field(gt=0)


class CandidatePolicy(_Strict):
    max_file_bytes: int = Field(gt=0, le=1_048_576)
    max_total_bytes: int = Field(gt=0, le=5_242_880)


class SandboxPolicy(_Strict):
    require_isolation: bool = False
    cpu_seconds: int = Field(gt=0)
    max_processes: int = Field(gt=0)
    max_file_bytes: int = Field(gt=0)
    max_open_files: int = Field(gt=16)
    wall_timeout_s: float = Field(gt=0)

    def limits(self) -> Any:
        """The sandbox runner's resource limits for one job (`kda.sandbox.runner.Limits`)."""
        from kda.sandbox.runner import Limits

        return Limits(cpu_seconds=self.cpu_seconds, max_processes=self.max_processes,
                      max_file_bytes=self.max_file_bytes, max_open_files=self.max_open_files)


class BenchmarkPolicy(_Strict):
    call_timeout_s: float = Field(120.0, gt=0, le=3600, description="Longest one candidate call may take.")
    # Integrity thresholds (floors: a workspace may lower them, never raise them).
    interference_ratio: float = Field(1.25, gt=1.0, le=2.0)
    cpu_interference_ratio: float = Field(3.0, gt=1.0, le=5.0)
    interference_second_look: bool = Field(
        True, description="Time a baseline slowed beside the candidate alone again before calling it interference "
                          "(false: the first comparison decides, stricter).")
    unaccounted_us: float = Field(10.0, gt=0, le=1000.0)
    unaccounted_ratio: float = Field(2.0, gt=0, le=10.0)
    spare_workers: Literal["off", "gpu", "always"] = Field(
        "gpu", description="Start the next run's worker processes ahead of time: never, on GPU devices, or always.")


class Policy(_Strict):
    name: str
    roles: dict[Literal["writer", "reviewer"], RolePolicy]
    paths: PathPolicy
    correctness: CorrectnessPolicy
    acceptance: AcceptancePolicy
    candidate: CandidatePolicy
    sandbox: SandboxPolicy
    benchmark: BenchmarkPolicy = BenchmarkPolicy()

    @field_validator("roles")
    @classmethod
    def _read_only_roles(cls, v: dict[str, RolePolicy]) -> dict[str, RolePolicy]:
        for role, rp in v.items():
            if rp.read_only:
                writes = sorted(set(rp.tools) - READ_ONLY_TOOLS)
                if writes:
                    raise ValueError(f"role {role!r} is read_only but lists tools that write: {writes}")
        return v

    def tools_for(self, role: str) -> list[str]:
        if role not in self.roles:
            raise PolicyError(f"policy {self.name!r} defines no role {role!r}; roles: {sorted(self.roles)}")
        return list(self.roles[role].tools)


def shipped_policy_text(name: str = "default") -> str:
    return resources.files("kda.policies").joinpath(f"{name}.toml").read_text()


def parse_policy(text: str, source: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"key '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors()
        )
        raise PolicyError(f"{source}: invalid policy: {problems}") from None


def load_policy(path: Path) -> Policy:
    """Load a workspace policy and check it never loosens the shipped floors of the same name."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file: {e.strerror}") from None
    policy = parse_policy(text, str(path))
    try:
        base = parse_policy(shipped_policy_text(policy.name), f"policies/{policy.name}.toml")
    except FileNotFoundError:
        base = parse_policy(shipped_policy_text("default"), "policies/default.toml")
    _check_floors(policy, base, str(path))
    return policy


def _check_floors(p: Policy, base: Policy, source: str) -> None:
    looser = []
    c, b = p.correctness, base.correctness
    if c.atol > b.atol:
        looser.append(f"correctness.atol {c.atol} > floor {b.atol}")
    if c.rtol > b.rtol:
        looser.append(f"correctness.rtol {c.rtol} > floor {b.rtol}")
    if c.required_matched_ratio < b.required_matched_ratio:
        looser.append(f"correctness.required_matched_ratio {c.required_matched_ratio} < floor {b.required_matched_ratio}")
    if c.min_trials < b.min_trials:
        looser.append(f"correctness.min_trials {c.min_trials} < floor {b.min_trials}")
    if base.sandbox.require_isolation and not p.sandbox.require_isolation:
        looser.append("sandbox.require_isolation turned off")
    bp, bb = p.benchmark, base.benchmark
    for key in ("interference_ratio", "cpu_interference_ratio", "unaccounted_us", "unaccounted_ratio"):
        if getattr(bp, key) > getattr(bb, key):
            looser.append(f"benchmark.{key} {getattr(bp, key)} > floor {getattr(bb, key)}")
    if bp.interference_second_look and not bb.interference_second_look:
        looser.append("benchmark.interference_second_look turned on")
    missing = [g for g in base.paths.protected if g not in p.paths.protected]
    if missing:
        looser.append(f"paths.protected drops {missing}")
    if looser:
        raise PolicyError(f"{source}: policy loosens the floors of policies/{base.name}.toml: " + "; ".join(looser))
