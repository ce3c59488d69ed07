"""The on-disk neuron-store format (version 2): keys, manifest, record layout.

A store is a directory holding an LMDB environment (``data.mdb``, the store of
record: manifest, checksums, segment table, dense tensors, files) and one flat
record file (``neurons.bin``) with every FFN neuron record.

``neurons.bin`` holds one *segment* per (layer, precision): that layer's records
at that precision back to back in neuron order (row-column bundles contiguous),
the segment starting at a multiple of ``SEGMENT_ALIGN`` bytes. A whole layer is
one sequential read and any id set is a few coalesced runs, read with
``os.preadv`` by a thread pool (store/segments.py), optionally with O_DIRECT.

LMDB keys:

- ``b"manifest"``                      JSON manifest (see :class:`Manifest`), written last.
- ``b"s" + >HB(layer, prec)``          segment: little-endian uint64 (offset, nbytes) in neurons.bin.
- ``b"c" + >HB(layer, prec)``          uint32 little-endian CRC-32C (Castagnoli) of every record
                                       of that layer and precision as stored, indexed by neuron id.
- ``b"o" + >HB(layer, prec)``          bitmap codec only: uint64 little-endian [d_ffn + 1] record
                                       offsets within the segment (record i = [o[i], o[i+1])).
- ``b"d" + name``                      a dense tensor (attention, norms, embeddings, head,
                                       OPT fc2 bias) in the checkpoint's dtype, raw bytes.
- ``b"t" + filename``                  a tokenizer / generation config file, raw bytes.
- ``b"policy"``, ``b"p" + ...``        precision policy and predictors (ranker).

Conversion writes both files into a temporary directory, fsyncs them and renames
the directory into place, so a store that opens is a finished one. Version 1
stores (one LMDB value per record) are refused with how to reconvert them.

A neuron is row i of the FFN input projection(s) plus column i of the output
projection, bundled as ``nvec`` vectors of length ``d_model``:
SwiGLU (Llama family): [gate_i, up_i, down[:, i]]; ReLU (OPT): [fc1_i, fc2[:, i]],
plus the fc1 bias b_i kept as float32 in every precision.

Record layout by precision (``bias`` present for ReLU models only):
- FULL: bias f32 | vectors in the checkpoint dtype, [nvec, d] row-major
- INT8: bias f32 | scales f16 [nvec] | int8 [nvec, d]
- INT4: bias f32 | scales f16 [nvec, d/group] | nibbles uint8 [ceil(nvec*d/2)]

Stores converted with pruning may use the "bitmap" codec (manifest ``codec``):
each record is then either the dense record above or, where smaller, its
bitmap sparse form (codec/bitmap.py); readers hand out dense records.

Redis keys of the DRAM tier reuse :func:`neuron_key` (``b"n" + >HBI``).
"""
from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field

import torch

from m2cache.codec import quant
from m2cache.errors import FormatVersionError, InvalidArgument

FORMAT_VERSION = 2
RECORDS_FILE = "neurons.bin"  # the flat record file beside data.mdb
SEGMENT_ALIGN = 4096          # segments start on page (and O_DIRECT) boundaries
CODECS = ("dense", "bitmap")  # how neuron records are stored (codec/bitmap.py)
MANIFEST_KEY = b"manifest"
POLICY_KEY = b"policy"


class Precision(enum.IntEnum):
    """Codes equal the proto enum m2cache.v1.Precision."""

    FULL = 1
    INT8 = 2
    INT4 = 3

    @classmethod
    def parse(cls, value: "str | int | Precision") -> "Precision":
        if type(value) is cls:  # the per-token callers: nothing to convert
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise InvalidArgument(f"unknown precision {value!r}; expected one of full, int8, int4") from None
        try:
            return cls(int(value))
        except ValueError:
            raise InvalidArgument(f"unknown precision code {value!r}; expected 1 (full), 2 (int8) or 3 (int4)") from None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise InvalidArgument(f"unsupported checkpoint dtype {dtype}; supported: {', '.join(DTYPES)}")


def neuron_key(layer: int, prec: Precision, neuron: int) -> bytes:
    return b"n" + struct.pack(">HBI", layer, int(prec), neuron)


def crc_key(layer: int, prec: Precision) -> bytes:
    return b"c" + struct.pack(">HB", layer, int(prec))


def segment_key(layer: int, prec: Precision) -> bytes:
    return b"s" + struct.pack(">HB", layer, int(prec))


def offsets_key(layer: int, prec: Precision) -> bytes:
    return b"o" + struct.pack(">HB", layer, int(prec))


def pack_segment(offset: int, nbytes: int) -> bytes:
    return struct.pack("<QQ", offset, nbytes)


def unpack_segment(raw: bytes) -> tuple[int, int]:
    offset, nbytes = struct.unpack("<QQ", raw)
    return offset, nbytes


def dense_key(name: str) -> bytes:
    return b"d" + name.encode()


def file_key(filename: str) -> bytes:
    return b"t" + filename.encode()


def crc32(data: bytes | memoryview) -> int:
    """zlib CRC-32: dense tensors, files and predictors (read once, not per token)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def int4_group_size(d_model: int, preferred: int = 32) -> int:
    """Largest power of two <= preferred dividing d_model (1 in the worst case)."""
    g = preferred
    while d_model % g:
        g //= 2
    return g


@dataclass(frozen=True, slots=True)
class RecordLayout:
    """Byte layout of one neuron record; the same for every layer of a store."""

    d_model: int
    nvec: int
    has_bias: bool
    dtype: str  # checkpoint dtype name, e.g. "float16"
    int4_group: int

    @property
    def bias_bytes(self) -> int:
        return 4 if self.has_bias else 0

    def num_bytes(self, prec: Precision) -> int:
        n = self.nvec * self.d_model
        if prec == Precision.FULL:
            return self.bias_bytes + n * DTYPES[self.dtype].itemsize
        if prec == Precision.INT8:
            return self.bias_bytes + 2 * self.nvec + n
        return self.bias_bytes + 2 * (n // self.int4_group) + (n + 1) // 2

    # ---- encode: [N, nvec, d] weights (+ [N] bias) -> [N, record_bytes] uint8
    def encode(self, vectors: torch.Tensor, bias: torch.Tensor | None, prec: Precision) -> torch.Tensor:
        num, nvec, d = vectors.shape
        assert (nvec, d) == (self.nvec, self.d_model), (vectors.shape, self)
        parts = []
        if self.has_bias:
            assert bias is not None and bias.shape == (num,)
            parts.append(_as_bytes(bias.float().reshape(num, 1)))
        if prec == Precision.FULL:
            parts.append(_as_bytes(vectors.to(DTYPES[self.dtype]).reshape(num, -1)))
        elif prec == Precision.INT8:
            q, s = quant.quantize_int8(vectors)
            parts += [_as_bytes(s), _as_bytes(q.reshape(num, -1))]
        else:
            codes, s = quant.quantize_int4(vectors, self.int4_group)
            parts += [_as_bytes(s.reshape(num, -1)), quant.pack_nibbles(codes.reshape(num, -1))]
        out = torch.cat(parts, dim=1)
        assert out.shape[1] == self.num_bytes(prec)
        return out

    # ---- decode: [N, record_bytes] uint8 -> ([N, nvec, d] float32, [N] f32 bias or None)
    def decode(self, records: torch.Tensor, prec: Precision) -> tuple[torch.Tensor, torch.Tensor | None]:
        num = records.shape[0]
        nvec, d = self.nvec, self.d_model
        bias = records[:, : self.bias_bytes].contiguous().view(torch.float32).reshape(num) if self.has_bias else None
        body = records[:, self.bias_bytes :]
        if prec == Precision.FULL:
            w = body.contiguous().view(DTYPES[self.dtype]).reshape(num, nvec, d).float()
        elif prec == Precision.INT8:
            s = body[:, : 2 * nvec].contiguous().view(torch.float16)
            q = body[:, 2 * nvec :].contiguous().view(torch.int8).reshape(num, nvec, d)
            w = quant.dequantize_int8(q, s)
        else:
            ns = 2 * (nvec * d // self.int4_group)
            s = body[:, :ns].contiguous().view(torch.float16).reshape(num, nvec, d // self.int4_group)
            codes = quant.unpack_nibbles(body[:, ns:], nvec * d).reshape(num, nvec, d)
            w = quant.dequantize_int4(codes, s, self.int4_group)
        return w, bias

    def decode_bytes(self, payload: bytes | memoryview, prec: Precision) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode a concatenation of records (a fetch payload)."""
        size = self.num_bytes(prec)
        if len(payload) % size:
            raise InvalidArgument(f"payload of {len(payload)} bytes is not a whole number of {size}-byte records")
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
        return self.decode(buf.reshape(-1, size), prec)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] tensor -> [N, nbytes] uint8 view of its raw little-endian bytes."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], -1)


@dataclass(slots=True)
class Manifest:
    """Everything a reader needs besides the records. Stored as JSON."""

    family: str  # "llama" | "opt"
    hf_config: dict
    dtype: str
    num_layers: int
    d_model: int
    d_ffn: int
    ffn_kind: str  # "swiglu" | "relu"
    int4_group: int
    dense: dict = field(default_factory=dict)  # name -> {"shape": [...], "dtype": str, "crc32": int}
    files: dict = field(default_factory=dict)  # filename -> {"crc32": int, "size": int}
    source: str = ""
    format_version: int = FORMAT_VERSION
    codec: str = "dense"  # "dense" | "bitmap": how neuron records are stored
    prune: dict = field(default_factory=dict)  # {"method", "sparsity", "calibration"} of a pruned conversion
    max_record_bytes: dict = field(default_factory=dict)  # precision name -> largest stored record (bitmap)
    records_file_bytes: int = 0  # size of neurons.bin (a shorter file is a truncated store)
    record_checksum: str = "crc32c"  # per-record checksum of the ``b"c"`` tables

    @property
    def layout(self) -> RecordLayout:
        relu = self.ffn_kind == "relu"
        return RecordLayout(self.d_model, 2 if relu else 3, relu, self.dtype, self.int4_group)

    def record_bytes(self) -> dict[str, int]:
        return {p.name.lower(): self.layout.num_bytes(p) for p in Precision}

    def stored_record_bytes(self, prec: Precision) -> int:
        """Upper bound of a stored record's size at ``prec`` (the dense size unless bitmap)."""
        dense = self.layout.num_bytes(prec)
        return int(self.max_record_bytes.get(prec.name.lower(), dense)) if self.codec == "bitmap" else dense

    def to_json(self) -> bytes:
        d = asdict(self)
        d["record_bytes"] = self.record_bytes()
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "store") -> "Manifest":
        d = json.loads(raw)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            source = d.get("source") or "CHECKPOINT_DIR"
            raise FormatVersionError(
                f"{where} has format version {version}, this m2cache reads version {FORMAT_VERSION} "
                f"(records in one flat file per store, CRC-32C per record); reconvert it: "
                f"m2cache convert {source} {where if where != 'store' else 'STORE_DIR'} --force")
        d.pop("record_bytes", None)
        if d.get("codec", "dense") not in CODECS:
            raise FormatVersionError(f"{where} stores records with codec {d['codec']!r}; this m2cache reads "
                                     f"{', '.join(CODECS)}")
        return cls(**d)
