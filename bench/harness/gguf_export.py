"""GGUF files for the llama.cpp peer, built once under the bench's out dir.

``f16_from_gguf``: the same model as a quantised GGUF, every weight matrix
dequantised to F16 (1-D norm weights stay F32, as llama.cpp's own converter
writes them for ``--outtype f16``), every metadata field copied, the file type
set to MOSTLY_F16. Written to a temp name and renamed, so a half-written file
is never picked up."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MOSTLY_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


def f16_from_gguf(src: Path, dst: Path) -> Path:
    """Write (or reuse, when newer than ``src``) an F16 copy of the GGUF ``src`` at ``dst``."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    import gguf
    from gguf.quants import dequantize

    from m2cache.convert.gguf import open_reader

    reader = open_reader(src)
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the writer writes the header and the architecture itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = MOSTLY_F16 if field.name == "general.file_type" else field.contents()
            writer.add_key_value(field.name, value, vtype, sub)
        for t in reader.tensors:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # [rows, cols] or [n]
            writer.add_tensor(t.name, w.astype(np.float16) if w.ndim >= 2 else np.array(w, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (F16 of %s)", dst, src.name)
    return dst


def quant_label(path: Path) -> str:
    """"Q4_1", "F16", ...: the type most of the file's weight matrices use."""
    from collections import Counter

    from m2cache.convert.gguf import open_reader

    reader = open_reader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0]


def ffn_bytes(path: Path) -> int:
    """Bytes of the FFN weight matrices as stored in the file (what a token's FFN reads)."""
    from m2cache.convert.gguf import open_reader

    reader = open_reader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if ".ffn_" in t.name)
