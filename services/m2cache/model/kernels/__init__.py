"""Compute kernels for the sparse mixed-precision FFN over neuron records.

``neuron_ffn(x, bands, layout)`` computes a layer's FFN output over the neurons of
``bands`` (ffn.Band: per precision, where each chosen neuron's record lives, in
neuron-id order) straight from the stored records: FULL rows in the checkpoint's
dtype, INT8/INT4 rows still packed with their scales. Nothing is decoded or
copied per token.

Two implementations:
- ``neuron_ffn.c`` (CPU): built once per machine with the system C compiler
  (m2cache/native.py), loaded with ctypes, OpenMP threads, AVX2/FMA/F16C where the
  CPU has them;
- a torch fallback (any device, or when no compiler is available, or with
  ``M2CACHE_KERNELS=torch``): gathers the records, decodes them and multiplies.
Both are deterministic for a given neuron order, so a cached run and an in-process
run with the same choice compute the same floats.

The same scheme (m2cache/native.py builds and loads them) serves the predictor's
per-token work: ``qcopy_scores`` (scores straight from a qcopy predictor's packed
codes) and ``select_bands`` (one row of scores -> the FULL/INT8/INT4 id sets by
threshold selection, no sort), and a lone sequence's decode step (``decode.c``:
``AttentionBlock``, a Llama layer's whole attention block and the FFN's input norm
in one call; ``dense_ffn``, the dense path's FFN; ``head``, the final norm and the
vocabulary projection). Each returns None where it does not apply (another device,
shape or dtype, no compiler): the caller runs its torch code, which they reproduce.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from pathlib import Path

import torch

from m2cache import native
from m2cache.codec.format import RecordLayout

KERNELS = Path(__file__).parent  # *.c sources, one shared library each (built by m2cache.native)
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_local = threading.local()


def _signatures() -> dict[str, tuple[str, int, dict[str, list]]]:
    """library -> (its ABI-version symbol, the version this module speaks, argtypes by function)."""
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    return {
        "neuron_ffn": ("m2c_abi_version", 3, {"m2c_neuron_ffn": [P, I64, I64, I32, P, I32, I32, I32, I32, I64,
                                                                 P, P, P, I32]}),
        "qcopy_scores": ("m2q_abi_version", 1, {"m2q_supported": [I64, I32],
                                                 "m2q_scores": [P, I64, I64, P, P, P, P, I64, I32, P, P, I32]}),
        "select_bands": ("m2b_abi_version", 1, {"m2b_bands": [P, I64, I64, I64, I64, P, P]}),
        "decode": ("m2d_abi_version", 1, {
            "m2d_attention_block": [P, P, P, P, I32, I64, I64, I64, I64, ctypes.c_float, P, P, I64, I64, P, P, P, I32],
            "m2d_dense_ffn": [P, P, P, P, P, I32, I32, I64, I64, P, I32],
            "m2d_head": [P, P, ctypes.c_float, P, I32, I64, I64, P, P, I32]}),
    }


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library ``name``, or None (no compiler, M2CACHE_KERNELS=torch)."""
    return native.load(KERNELS / f"{name}.c", *_signatures()[name])


def _load() -> ctypes.CDLL | None:
    return _library("neuron_ffn")


def backend(device: torch.device | str = "cpu") -> str:
    """"c-avx2", "c-scalar" or "torch": what ``neuron_ffn`` runs on ``device``."""
    if torch.device(device).type != "cpu":
        return "torch"
    lib = _load()
    if lib is None:
        return "torch"
    return "c-avx2" if lib.m2c_simd() == 2 else "c-scalar"


# ---- the call ---------------------------------------------------------------------------
class _Workspace:
    """Per-thread buffers reused across calls (no allocation per layer)."""

    def __init__(self):
        self.scratch = torch.empty(0)
        self.xq = torch.empty(0, dtype=torch.int8)
        self.desc = (ctypes.c_int64 * (_DESC * 3))()
        self.bands_work = torch.empty(0, dtype=torch.long)
        self.qcopy = torch.empty(0)
        self.decode = torch.empty(0)  # decode.py's float32 scratch

    def sized(self, threads: int, R: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scratch.numel() < threads * R * d:
            self.scratch = torch.empty(threads * R * d)
        need = 2 * R * d + 8 * R * (d // 32) + 64
        if self.xq.numel() < need:
            self.xq = torch.empty(need, dtype=torch.int8)
        return self.scratch, self.xq


_DESC = 9  # int64 fields per band in the C call (neuron_ffn.c)


def _workspace() -> _Workspace:
    ws = getattr(_local, "ws", None)
    if ws is None:
        ws = _local.ws = _Workspace()
    return ws


@contextlib.contextmanager
def torch_only():
    """Run this thread's FFNs on the torch fallback (exact decoded-weight arithmetic):
    tests compare the kernel's choice of neurons and precisions with transformers."""
    _local.torch_only = True
    try:
        yield
    finally:
        _local.torch_only = False


def neuron_ffn(x: torch.Tensor, bands, layout: RecordLayout, num_neurons: int) -> torch.Tensor:
    """x: [R, d] FFN input rows -> y [R, d] float32 = the FFN over ``bands``.

    bands: ffn.Band list (at most one per precision), records on x's device, of a
    layer of ``num_neurons`` (threads split the neurons by id range: see the C source)."""
    lib = _load() if x.device.type == "cpu" and not getattr(_local, "torch_only", False) else None
    if lib is None:
        return _torch_neuron_ffn(x, bands, layout)
    x = x.float().contiguous()
    R, d = x.shape
    y = torch.zeros(R, d)
    live = [b for b in bands if b.num_neurons]
    if not live:
        return y
    assert len(live) <= 3, "one band per precision"
    ws = _workspace()
    threads = torch.get_num_threads()
    scratch, xq = ws.sized(threads, R, d)
    keep = []  # tensors whose addresses the call uses
    for i, band in enumerate(live):
        tables = band.tables
        assert len(tables) <= 2, "a band's records lie in at most two tables"
        ids, rows = band.ids.long().contiguous(), band.rows.long().contiguous()
        mask = None if band.mask is None else band.mask.float().contiguous()
        which = None if band.which is None else band.which.long().contiguous()
        keep += [ids, rows, mask, which]
        ws.desc[_DESC * i : _DESC * (i + 1)] = [
            ids.data_ptr(), rows.data_ptr(), 0 if which is None else which.data_ptr(),
            tables[0].data_ptr(), tables[-1].data_ptr(), band.num_neurons, 0 if mask is None else mask.data_ptr(),
            int(band.prec), tables[0].shape[1]]
    lib.m2c_neuron_ffn(x.data_ptr(), R, d, len(live), ctypes.addressof(ws.desc), layout.nvec,
                       _DTYPE_CODES[layout.dtype], layout.int4_group, int(layout.has_bias), num_neurons,
                       y.data_ptr(), scratch.data_ptr(), xq.data_ptr(), threads)
    return y


def _torch_neuron_ffn(x: torch.Tensor, bands, layout: RecordLayout) -> torch.Tensor:
    """Any device: gather each band's records, decode them, multiply (a copy per call).
    Masked bands (rows of a batch that chose differently) run row by row over each
    row's own neurons, so a row's result never depends on the others'."""
    xf = x.float()
    y = torch.zeros_like(xf)
    for band in bands:
        if not band.num_neurons:
            continue
        vectors, bias = layout.decode(band.gather(), band.prec)  # [n, nvec, d], [n] | None
        vectors = vectors.to(xf.device)
        bias = None if bias is None else bias.to(xf.device)
        if band.mask is None:
            y += _decoded_ffn(xf, vectors, bias)
            continue
        for r in range(xf.shape[0]):
            keep = band.mask[r].to(xf.device) != 0
            y[r : r + 1] += _decoded_ffn(xf[r : r + 1], vectors[keep], None if bias is None else bias[keep])
    return y


def _decoded_ffn(x: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [R, d], vectors [n, nvec, d] float32 -> [R, d]."""
    pre = x @ vectors[:, 0].T  # [R, n]
    act = torch.relu(pre + bias) if bias is not None else torch.nn.functional.silu(pre) * (x @ vectors[:, 1].T)
    return act @ vectors[:, -1]


def qcopy_scores(x: torch.Tensor, gate_codes: torch.Tensor, gate_scale: torch.Tensor, up_codes: torch.Tensor,
                 up_scale: torch.Tensor, bits: int) -> torch.Tensor | None:
    """|silu(g) * u| of a qcopy predictor straight from its packed codes (x [R, d] ->
    [R, F] float32), or None where the C kernel does not apply (the caller decodes)."""
    lib = _library("qcopy_scores") if x.device.type == "cpu" and not getattr(_local, "torch_only", False) else None
    R, d = x.shape
    if lib is None or not _qcopy_supported(lib, d, bits):
        return None
    x = x.float().contiguous()
    F = gate_codes.shape[0]
    out = torch.empty(R, F)
    ws = _workspace()
    if ws.qcopy.numel() < R * (d + d // 32 + 2) + 4:
        ws.qcopy = torch.empty(R * (d + d // 32 + 2) + 4)
    tensors = [t.contiguous() for t in (gate_codes, gate_scale, up_codes, up_scale)]
    lib.m2q_scores(x.data_ptr(), R, d, tensors[0].data_ptr(), tensors[1].data_ptr(), tensors[2].data_ptr(),
                   tensors[3].data_ptr(), F, bits, out.data_ptr(), ws.qcopy.data_ptr(), torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=None)
def _qcopy_supported(lib, d: int, bits: int) -> bool:
    return bool(lib.m2q_supported(d, bits))


def select_bands(scores: torch.Tensor, e1: int, e2: int, e3: int) -> tuple[torch.Tensor, ...] | None:
    """One row of scores [n] (CPU) -> (FULL, INT8, INT4) ascending ids: the e1 best, the
    next e2 - e1, the next e3 - e2 (NaN ranks first); None where the C kernel does not apply."""
    lib = _library("select_bands") if scores.device.type == "cpu" and not getattr(_local, "torch_only", False) else None
    if lib is None:
        return None
    scores = scores.float().contiguous()
    n = scores.numel()
    ws = _workspace()
    if ws.bands_work.numel() < n:  # select_bands.c: uint32 keys and candidates, n each
        ws.bands_work = torch.empty(n, dtype=torch.long)
    out = torch.empty(e3, dtype=torch.long)
    lib.m2b_bands(scores.data_ptr(), n, e1, e2, e3, out.data_ptr(), ws.bands_work.data_ptr())
    return out.split((e1, e2 - e1, e3 - e2))


# the decode-step kernels (their own module; it uses the loader and workspace above)
from m2cache.model.kernels.decode import AttentionBlock, dense_ffn, head  # noqa: E402,F401
