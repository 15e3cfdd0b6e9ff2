"""The results file the candidate's worker writes and the trusted worker reads: tensors as raw bytes.

torch.save pickles into a zip and checksums every byte; for a 120 MB activation written three
times per workload that was most of a benchmark's wall time. This format is a JSON header and
the tensors' bytes, written and read at memory speed. The reader trusts nothing in the file: the
header is size-capped, every dtype must be known, every tensor must lie inside the file and its
byte count must match its shape. Anything else raises ExchangeError with the reason.

    header = {"records": [{"outputs": [item, ...], "inputs": [item, ...]}, ...],
              "tensors": [{"dtype": "bfloat16", "shape": [8, 4096], "offset": 0, "nbytes": 65536}, ...]}
    item   = {"t": index into tensors} | {"v": a JSON scalar}
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np
import torch

MAGIC = b"KDAX1\n"
MAX_HEADER = 4 << 20
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_ALIGN = 64

# Captured when the worker imports this module, before any candidate code.
_json_dumps, _json_loads = json.dumps, json.loads
_from_numpy = torch.from_numpy


class ExchangeError(ValueError):
    pass


def save(records: list[dict[str, list[Any]]], path: str) -> None:
    """Write records of tensors (any device) and JSON scalars to `path`."""
    metas: list[dict[str, Any]] = []
    blobs: list[np.ndarray] = []
    offset = 0

    def item(x: Any) -> dict[str, Any]:
        nonlocal offset
        if isinstance(x, torch.Tensor):
            t = x.detach()
            name = str(t.dtype).removeprefix("torch.")
            if name not in DTYPES:
                raise ExchangeError(f"dtype {name} cannot be exchanged")
            raw = t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy() if t.numel() else np.empty(0, np.uint8)
            metas.append({"dtype": name, "shape": list(t.shape), "offset": offset, "nbytes": int(raw.nbytes)})
            blobs.append(raw)
            offset += -(-raw.nbytes // _ALIGN) * _ALIGN
            return {"t": len(metas) - 1}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise ExchangeError(f"a {type(x).__name__} cannot be exchanged")

    recs = [{k: [item(x) for x in v] for k, v in r.items()} for r in records]
    head = _json_dumps({"records": recs, "tensors": metas}).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        base = f.tell()
        for m, raw in zip(metas, blobs):
            f.seek(base + m["offset"])
            f.write(memoryview(raw))
        f.truncate(base + offset)


def load(path: str) -> list[dict[str, list[Any]]]:
    """Read a file written by `save`; tensors come back on the CPU."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ExchangeError("not a results file (bad magic)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ExchangeError(f"header of {n} bytes is over the {MAX_HEADER}-byte limit")
        try:
            head = _json_loads(f.read(n))
            recs, metas = head["records"], head["tensors"]
        except (ValueError, KeyError, TypeError) as e:
            raise ExchangeError(f"unreadable header: {e}") from None
        base = len(MAGIC) + 8 + n
        tensors = [_read(f, m, base, size, i) for i, m in enumerate(metas if isinstance(metas, list) else [])]

    def value(it: Any) -> Any:
        if isinstance(it, dict) and "t" in it and isinstance(it["t"], int) and 0 <= it["t"] < len(tensors):
            return tensors[it["t"]]
        if isinstance(it, dict) and "v" in it and (it["v"] is None or isinstance(it["v"], (bool, int, float, str))):
            return it["v"]
        raise ExchangeError(f"bad item {str(it)[:80]}")

    if not isinstance(recs, list):
        raise ExchangeError("records is not a list")
    out = []
    for r in recs:
        if not isinstance(r, dict) or not all(isinstance(v, list) for v in r.values()):
            raise ExchangeError("a record is not a mapping of lists")
        out.append({str(k): [value(it) for it in v] for k, v in r.items()})
    return out


def _read(f: Any, m: Any, base: int, size: int, i: int) -> torch.Tensor:
    try:
        dtype = DTYPES[m["dtype"]]
        shape = [int(s) for s in m["shape"]]
        off, nbytes = int(m["offset"]), int(m["nbytes"])
    except (KeyError, TypeError, ValueError):
        raise ExchangeError(f"tensor {i}: bad description {str(m)[:120]}") from None
    if any(s < 0 for s in shape) or nbytes != math.prod(shape) * dtype.itemsize:
        raise ExchangeError(f"tensor {i}: {nbytes} bytes do not fit shape {shape} of {m['dtype']}")
    if off < 0 or base + off + nbytes > size:
        raise ExchangeError(f"tensor {i}: bytes {off}..{off + nbytes} lie outside the file")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buf = np.empty(nbytes, dtype=np.uint8)
    f.seek(base + off)
    if f.readinto(memoryview(buf)) != nbytes:
        raise ExchangeError(f"tensor {i}: short read")
    return _from_numpy(buf).view(dtype).reshape(shape)
