"""Tasks: a flashinfer-bench Definition, its Workloads and an optional baseline Solution.

A task comes from a FlashInfer Trace folder (`definitions/{op_type}/NAME.json`,
`workloads/{op_type}/NAME.jsonl`), from the built-in folder `kernels/` (same layout), or from
explicit files. `init_workspace` validates everything with flashinfer-bench's own models and
builds the workspace in a temporary directory first, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import PERSON
from .errors import BadInput
from .policy import parse_policy, shipped_policy_text
from .workspace import Workspace, compute_lock


@dataclass
class TaskSource:
    name: str
    definition: dict[str, Any]
    workloads: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    origin: str


def builtin_dataset() -> Path:
    """The built-in tasks (`kernels/`, installed as kda/kernels beside kda/tools). Found by path,
    not imported: the folder has no __init__.py, so on a path that starts at the repository root
    it does not hide the PyPI package `kernels`, which transformers imports."""
    return Path(__file__).resolve().parent.parent / "kernels"


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in builtin_dataset().glob("definitions/*/*.json"))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_workloads(path: Path) -> list[dict[str, Any]]:
    """Accept flashinfer-bench trace lines ({"workload": {...}}) or bare Workload objects."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BadInput(f"cannot read workloads {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"workloads {path} line {n} is not valid JSON: {e.msg}") from None
        out.append(obj["workload"] if isinstance(obj, dict) and "workload" in obj else obj)
    if not out:
        raise BadInput(f"workloads file {path} holds no workload")
    return out


def find_in_dataset(dataset: Path, name: str) -> TaskSource:
    dataset = Path(dataset)
    if not (dataset / "definitions").is_dir():
        raise BadInput(f"{dataset} is not a FlashInfer Trace folder (no definitions/ inside)")
    defs = sorted(dataset.glob(f"definitions/*/{name}.json"))
    if not defs:
        known = sorted(p.stem for p in dataset.glob("definitions/*/*.json"))
        raise BadInput(f"unknown task {name!r} in {dataset}; known: {', '.join(known) or 'none'}")
    op_type = defs[0].parent.name
    wl = dataset / "workloads" / op_type / f"{name}.jsonl"
    if not wl.is_file():
        raise BadInput(f"task {name!r} has no workloads file at workloads/{op_type}/{name}.jsonl in {dataset}")
    baseline = None
    sol_dir = dataset / "solutions" / op_type / name
    if (sol_dir / "baseline.json").is_file():
        baseline = _read_json(sol_dir / "baseline.json", "baseline solution")
    return TaskSource(name, _read_json(defs[0], "definition"), _read_workloads(wl), baseline, str(defs[0]))


def resolve_task(name: str | None, dataset: str | None, definition: str | None, workloads: str | None,
                 baseline: str | None) -> TaskSource:
    if definition or workloads:
        if not (definition and workloads):
            raise BadInput("--definition and --workloads go together")
        d = _read_json(Path(definition), "definition")
        src = TaskSource(str(d.get("name", "")) if isinstance(d, dict) else "", d, _read_workloads(Path(workloads)),
                         None, str(definition))
    elif name:
        ds = dataset or os.environ.get("FIB_DATASET_PATH")
        if ds:
            src = find_in_dataset(Path(ds), name)
        elif name in builtin_tasks():
            src = find_in_dataset(builtin_dataset(), name)
        else:
            raise BadInput(f"unknown task {name!r}; built-in tasks: {', '.join(builtin_tasks())} "
                           "(or pass --dataset / set FIB_DATASET_PATH)")
    else:
        raise BadInput("name a task (--task NAME) or give --definition FILE --workloads FILE")
    if baseline:
        src.baseline = _read_json(Path(baseline), "baseline solution")
    validate_task(src)
    return src


def validate_task(src: TaskSource) -> None:
    """Validate with flashinfer-bench's pydantic models (imported here: they pull in torch)."""
    from flashinfer_bench.data import Definition, Solution, Workload
    from pydantic import ValidationError

    def problems(e: ValidationError) -> str:
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5])

    try:
        d = Definition.model_validate(src.definition)
    except ValidationError as e:
        raise BadInput(f"malformed definition ({src.origin}): {problems(e)}") from None
    src.name = d.name
    var_axes = {k for k, a in src.definition["axes"].items() if a.get("type") == "var"}
    seen: set[str] = set()
    for i, w in enumerate(src.workloads, 1):
        try:
            wl = Workload.model_validate(w)
        except ValidationError as e:
            raise BadInput(f"malformed workload #{i}: {problems(e)}") from None
        if wl.uuid in seen:
            raise BadInput(f"workload #{i}: duplicate uuid {wl.uuid}")
        seen.add(wl.uuid)
        missing_axes = var_axes - set(wl.axes)
        if missing_axes:
            raise BadInput(f"workload {wl.uuid}: no value for var axes {sorted(missing_axes)}")
        missing_inputs = set(src.definition["inputs"]) - set(wl.inputs)
        if missing_inputs:
            raise BadInput(f"workload {wl.uuid}: no spec for inputs {sorted(missing_inputs)}")
    if src.baseline is not None:
        try:
            sol = Solution.model_validate(src.baseline)
        except ValidationError as e:
            raise BadInput(f"malformed baseline solution: {problems(e)}") from None
        if sol.definition != d.name:
            raise BadInput(f"baseline solution is for {sol.definition!r}, not {d.name!r}")


def _write_task(dest: Path, src: TaskSource, policy_text: str) -> None:
    (dest / "task" / "baseline").mkdir(parents=True)
    (dest / "task" / "definition.json").write_text(json.dumps(src.definition, indent=2) + "\n")
    (dest / "task" / "workloads.jsonl").write_text("".join(json.dumps(w) + "\n" for w in src.workloads))
    if src.baseline is not None:
        (dest / "task" / "baseline" / "solution.json").write_text(json.dumps(src.baseline, indent=2) + "\n")
    else:
        (dest / "task" / "baseline" / "README.md").write_text(
            "No baseline solution was given: the definition's reference implementation is the baseline.\n"
        )
    (dest / "policy.toml").write_text(policy_text)
    (dest / "task" / "lock.json").write_text(json.dumps(compute_lock(dest), indent=2) + "\n")


def init_workspace(dest: Path, src: TaskSource, policy: str = "default", force: bool = False) -> Workspace:
    dest = Path(dest).absolute()
    try:
        policy_text = shipped_policy_text(policy)
    except FileNotFoundError:
        raise BadInput(f"unknown policy {policy!r}") from None
    parse_policy(policy_text, f"policies/{policy}.toml")
    exists = dest.exists() and any(dest.iterdir()) if dest.exists() else False
    if exists and not force:
        raise BadInput(f"{dest} already exists and is not empty; choose another directory or pass --force "
                       "to re-create its task and lock (work/ and history are kept)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kda-init-", dir=dest.parent))
    try:
        os.chmod(staging, 0o755)
        _write_task(staging, src, policy_text)
        if not exists:
            (staging / "work").mkdir()
            if dest.exists():
                dest.rmdir()
            os.rename(staging, dest)
        else:
            # Re-lock by a person: swap task/ and policy.toml, keep work/ and .kda/.
            old = Path(tempfile.mkdtemp(prefix=".kda-old-", dir=dest.parent))
            for part in ("task", "policy.toml"):
                if (dest / part).exists():
                    os.rename(dest / part, old / part)
                os.rename(staging / part, dest / part)
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            (dest / "work").mkdir(exist_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ws = Workspace.open(dest)
    ws.audit.append(PERSON, "cli", "init --force" if exists else "init", {"task": src.name, "origin": src.origin}, "ok")
    return ws
