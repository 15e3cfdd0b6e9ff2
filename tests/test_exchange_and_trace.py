"""The results-file format between the workers, and how a device trace is split into timed calls."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import HAS_GPU
from kda.sandbox import device_trace as DT
from kda.sandbox import exchange


# --- exchange ------------------------------------------------------------------------------------
STAGINGS = ["none", "host", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("staging", STAGINGS)
def test_roundtrip_keeps_values_dtypes_and_shapes(tmp_path, staging):
    g = torch.Generator().manual_seed(0)
    recs = [{"outputs": [torch.randn(3, 5, generator=g).to(torch.bfloat16), 7],
             "inputs": [torch.randint(-9, 9, (4,), generator=g, dtype=torch.int64), 0.5, None,
                        torch.zeros(0, 4096, dtype=torch.float16), torch.tensor([True, False])]},
            {"outputs": [torch.randn(2, 2, generator=g)[:, 1]], "inputs": []}]  # non-contiguous
    stage = None if staging == "none" else exchange.Staging(pinned=staging == "cuda")
    written = recs
    if staging == "cuda":  # device tensors go to the file through the page-locked buffer
        written = [{k: [x.cuda() if isinstance(x, torch.Tensor) else x for x in v] for k, v in r.items()} for r in recs]
    f = tmp_path / "x.kdax"
    exchange.save(written, str(f), stage)
    back = exchange.load(str(f), stage)
    assert len(back) == 2
    for want, got in zip(recs, back):
        for k in want:
            assert len(got[k]) == len(want[k])
            for a, b in zip(want[k], got[k]):
                if isinstance(a, torch.Tensor):
                    assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
                else:
                    assert a == b


def _write_raw(path, header: dict, payload: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(exchange.MAGIC + struct.pack("<Q", len(head)) + head + payload)


@pytest.mark.parametrize("header, payload, reason", [
    ({"records": [{"outputs": [{"t": 0}]}],
      "tensors": [{"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]}, b"\0" * 8, "outside the file"),
    ({"records": [{"outputs": [{"t": 0}]}],
      "tensors": [{"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 12}]}, b"\0" * 16, "do not fit"),
    ({"records": [{"outputs": [{"t": 0}]}],
      "tensors": [{"dtype": "complex64", "shape": [1], "offset": 0, "nbytes": 8}]}, b"\0" * 8, "bad description"),
    ({"records": [{"outputs": [{"t": 3}]}], "tensors": []}, b"", "bad item"),
    ({"records": [{"outputs": [{"v": [1, 2]}]}], "tensors": []}, b"", "bad item"),
    ({"records": "nope", "tensors": []}, b"", "not a list"),
])
@pytest.mark.parametrize("staged", [False, True])
def test_a_forged_file_is_refused_with_the_reason(tmp_path, header, payload, reason, staged):
    f = tmp_path / "bad.kdax"
    _write_raw(f, header, payload)
    with pytest.raises(exchange.ExchangeError, match=reason):
        exchange.load(str(f), exchange.Staging(pinned=False) if staged else None)


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    f = tmp_path / "x.pt"
    torch.save([{"outputs": [torch.ones(2)]}], f)
    with pytest.raises(exchange.ExchangeError, match="magic"):
        exchange.load(str(f))
    f.write_bytes(exchange.MAGIC + struct.pack("<Q", exchange.MAX_HEADER + 1))
    with pytest.raises(exchange.ExchangeError, match="limit"):
        exchange.load(str(f))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_file_written_again_in_place_reads_back_the_new_records(tmp_path, threads, monkeypatch):
    # Small parts, so three threads really split the read.
    monkeypatch.setattr(exchange, "_MIN_PART", 1024)
    stage = exchange.Staging(pinned=False)
    f = tmp_path / "0.kdax"
    big = torch.arange(40_000, dtype=torch.float32)
    exchange.save([{"outputs": [big]}], str(f), stage)
    size = f.stat().st_size
    small = torch.full((1000,), -3.0, dtype=torch.float32)
    exchange.save([{"outputs": [small, 5]}], str(f), stage)
    assert f.stat().st_size == size  # kept: its pages are reused by the next large write
    [rec] = exchange.load(str(f), stage, threads=threads)
    assert torch.equal(rec["outputs"][0], small) and rec["outputs"][1] == 5
    exchange.save([{"outputs": [big * 2]}], str(f), stage)
    [rec] = exchange.load(str(f), stage, threads=threads)
    assert torch.equal(rec["outputs"][0], big * 2)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "missing"])
def test_only_a_regular_file_is_read(tmp_path, kind):
    f = tmp_path / "0.kdax"
    if kind == "symlink":
        real = tmp_path / "real.kdax"
        exchange.save([{"outputs": [torch.ones(3)]}], str(real))
        f.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(f)  # opening it for reading would block the trusted worker until a writer came
    with pytest.raises(exchange.ExchangeError, match="regular file|cannot open"):
        exchange.load(str(f), exchange.Staging(pinned=False))


def test_a_parallel_read_stops_where_the_file_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(exchange, "_MIN_PART", 1024)
    f = tmp_path / "0.kdax"
    exchange.save([{"outputs": [torch.ones(20_000)]}], str(f))
    n = f.stat().st_size
    buf = bytearray(n + 4096)
    # The file ends inside the second of three parts: what the reader gets stops there.
    cut = n // 2
    f.write_bytes(f.read_bytes()[:cut])
    with f.open("rb") as fh:
        assert exchange._pread_all(fh.fileno(), memoryview(buf)[:n], 0, 3) == cut


# --- trace splitting -----------------------------------------------------------------------------
def _acts(*spec):
    return sorted((DT.Activity(n, s, e, st) for n, s, e, st in spec), key=lambda a: a.start_ns)


SPIN = "at::cuda::(anonymous namespace)::spin_kernel(long)"


def test_each_call_is_the_span_of_its_work_on_every_stream():
    acts = _acts(
        ("randn", 0, 500, 7), (SPIN, 1_000, 21_000, 7), ("k1", 21_100, 24_100, 7), ("k2", 24_200, 30_200, 7),
        (SPIN, 40_000, 40_100, 7),  # marker: after the sync
        ("randn", 41_000, 42_000, 7), (SPIN, 43_000, 63_000, 7), ("k1", 63_050, 66_050, 7),
        ("side", 63_100, 90_000, 9),  # left running on another stream
        (SPIN, 95_000, 95_100, 7))
    spans = DT.Tracer().spans_us(acts, 2)
    assert spans[0] == (pytest.approx(9.1), 2, 1)
    assert spans[1] == (pytest.approx(26.95), 2, 2)


def test_the_launch_gap_runs_from_each_hold_to_its_first_queued_work():
    acts = _acts(
        (SPIN, 1_000, 21_000, 7), ("k1", 22_000, 24_000, 7), ("side", 22_500, 23_000, 9),
        (SPIN, 30_000, 30_100, 7),
        (SPIN, 32_000, 35_000, 7), (SPIN, 36_000, 36_100, 7),  # a frame with no work has no gap
        (SPIN, 40_000, 60_000, 7), ("k1", 61_250, 62_000, 7), (SPIN, 70_000, 70_100, 7))
    assert DT.Tracer.launch_gaps_us(acts) == [pytest.approx(1.0), pytest.approx(1.25)]


PROBE_WITH_A_FAKE_DEVICE = """
import sys, torch
from kda.sandbox import bench_worker as W, device_trace as DT
SPIN = {spin!r}
GAPS = [5.0, 1.0, 1.25, 1.5, 1.25, 9.0]  # us: the first frame (cold clocks) and a tail
class Hold:
    def __call__(self, us): pass
    def mark(self): pass
class Tracer:
    def start(self): pass
    def abandon(self): pass
    def stop(self):
        acts, t = [], 0
        for g in GAPS:
            acts += [DT.Activity(SPIN, t, t + 20_000, 7), DT.Activity("add", t + 20_000 + int(g * 1e3), t + 22_000 + int(g * 1e3), 7),
                     DT.Activity(SPIN, t + 40_000, t + 40_100, 7)]
            t += 50_000
        return acts
W._cuda_sync = lambda: None  # no device here: the frames come from the fake tracer
print("GAP", W.probe_launch_gap_us(Tracer(), Hold(), torch.device("cpu"), frames=len(GAPS)), file=sys.stderr)
"""


def test_the_launch_gap_probe_leaves_out_the_first_frame_and_the_tails():
    # In a subprocess: importing the worker module hands its stdout to the worker protocol.
    res = subprocess.run([sys.executable, "-c", PROBE_WITH_A_FAKE_DEVICE.format(spin=SPIN)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    gap = float(next(ln for ln in res.stderr.splitlines() if ln.startswith("GAP "))[4:])
    gaps = [1.0, 1.25, 1.5, 1.25, 9.0]  # the frames after the first
    assert gap == pytest.approx(DT.middle_mean(gaps))
    assert 1.0 <= gap <= 1.5  # the cold first frame (5 us) and the slow tail (9 us) stay out


def test_middle_mean_ignores_the_tails_and_moves_between_grid_steps():
    # Timestamps on a 32 ns grid: a median sits on a step, the middle mean between steps.
    grid = [0.992] * 45 + [1.024] * 55 + [40.0] * 10  # and a tail of slow host launches
    assert sorted(grid)[len(grid) // 2] == 1.024
    assert DT.middle_mean(grid) == pytest.approx((0.992 * 18 + 1.024 * 38) / 56)
    assert DT.middle_mean([5.0]) == 5.0
    with pytest.raises(DT.TraceError):
        DT.middle_mean([])


def test_a_call_with_no_device_work_reads_zero():
    acts = _acts((SPIN, 0, 10_000, 7), (SPIN, 12_000, 12_100, 7))
    assert DT.Tracer().spans_us(acts, 1) == [(0.0, 0, 0)]


def test_an_extra_or_missing_spin_kernel_is_tampering():
    acts = _acts((SPIN, 0, 10_000, 7), ("k", 10_100, 11_000, 7), (SPIN, 10_500, 10_600, 9),
                 (SPIN, 12_000, 12_100, 7))
    with pytest.raises(DT.TraceError, match="3 spin kernels"):
        DT.Tracer().spans_us(acts, 1)
    with pytest.raises(DT.TraceError, match="expected 4"):
        DT.Tracer().spans_us(_acts((SPIN, 0, 10, 7), (SPIN, 20, 30, 7)), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_a_traced_kernel_reads_its_device_time():
    """On a GPU: two small kernels between a hold and a marker read back as two activities."""
    if not DT.Tracer.available():
        pytest.skip("this torch build has no CUPTI")
    hold, tr = DT.SpinHold(torch.device("cuda")), DT.Tracer()
    x = torch.ones(1 << 20, device="cuda")
    x.mul_(2)  # loads both kernels before the trace: a first launch takes milliseconds
    tr.start()
    for _ in range(5):
        hold(500.0)  # long enough to queue both launches behind it, even on a busy host
        x = torch.ones(1 << 20, device="cuda")
        x.mul_(2)
        torch.cuda.synchronize()
        hold.mark()
    acts = tr.stop()
    spans = tr.spans_us(acts, 5)
    assert all(n == 2 and 0.5 < us < 200 for us, n, _ in spans), spans
    assert 0.1 < DT.middle_mean(DT.Tracer.launch_gaps_us(acts)) < 10.0
