"""A lone sequence's decode step on CPU (decode.c): the shapes a decoding worker runs
every layer of every token (batch 1, one new token), as one C call each where the
torch code is many small ops. ``AttentionBlock`` (a Llama layer's attention block and
the FFN's input norm), ``dense_ffn`` (ffn.DenseFFN's matrices), ``head`` (the final
norm and the vocabulary projection). Each returns None where it does not apply
(another device, shape or dtype; no compiler; ``kernels.torch_only()``), and the
caller runs the torch code, which these reproduce up to the order of float32 sums."""
from __future__ import annotations

import ctypes

import torch

from m2cache.model import kernels


def _decode_lib(*tensors: torch.Tensor | None):
    """decode.c where it applies to these tensors (CPU, one supported dtype, contiguous)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if getattr(kernels._local, "torch_only", False) or _dtype_code(dtype) is None or any(
            t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in present):
        return None
    return kernels._library("decode")


def _dtype_code(dtype: torch.dtype) -> int | None:
    return kernels._DTYPE_CODES.get(str(dtype).removeprefix("torch."))


def _decode_work(floats: int) -> torch.Tensor:
    ws = kernels._workspace()
    if ws.decode.numel() < floats:
        ws.decode = torch.empty(max(floats, 2 * ws.decode.numel()))
    return ws.decode


class AttentionBlock:
    """A Llama layer's attention weights as ``m2d_attention_block`` takes them (their
    addresses, kept with the tensors that own them); ``build`` returns None where the
    kernel does not apply."""

    __slots__ = ("lib", "ptrs", "keep", "dt", "eps", "d")

    @classmethod
    def build(cls, wqkv, bqkv, wo, bo, attn_norm, ffn_norm, eps: float) -> "AttentionBlock | None":
        tensors = [wqkv, bqkv, wo, bo, attn_norm, ffn_norm]
        lib = _decode_lib(*tensors)
        if lib is None:
            return None
        self = cls()
        self.lib, self.keep, self.eps, self.d = lib, [t for t in tensors if t is not None], float(eps), wo.shape[0]
        self.dt = _dtype_code(wqkv.dtype)
        self.ptrs = (ctypes.c_int64 * 6)(*[0 if t is None else t.data_ptr() for t in tensors])
        return self

    def __call__(self, x: torch.Tensor, heads, kv_rows: tuple[torch.Tensor, torch.Tensor], pos: int,
                 rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [1, 1, d] (this layer's input, the model's dtype) -> (x + attention, the FFN's
        normed input), both [1, 1, d]; writes the token's k/v at ``pos`` of ``kv_rows``
        (a slot's [Hkv, max_len, D] float32 rows). None where the call does not apply."""
        k, v = kv_rows
        if getattr(kernels._local, "torch_only", False) or k.dtype != torch.float32 or not x.is_contiguous() \
                or x.dtype != self.keep[0].dtype:
            return None
        H, Hkv, D = heads.num_heads, heads.num_kv_heads, heads.head_dim
        threads = torch.get_num_threads()
        work = _decode_work(2 * self.d + (2 * H + 2 * Hkv) * D + threads * (pos + 1))
        x_out, h_out = torch.empty_like(x), torch.empty_like(x)
        cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
        self.lib.m2d_attention_block(x.data_ptr(), x_out.data_ptr(), h_out.data_ptr(), ctypes.addressof(self.ptrs),
                                     self.dt, self.d, H, Hkv, D, self.eps, k.data_ptr(), v.data_ptr(), k.shape[1],
                                     pos, None if cos is None else cos.data_ptr(),
                                     None if sin is None else sin.data_ptr(), work.data_ptr(), threads)
        return x_out, h_out


def dense_ffn(h: torch.Tensor, w_in: torch.Tensor, bias: torch.Tensor | None, w_out: torch.Tensor,
              relu: bool) -> torch.Tensor | None:
    """h [1, 1, d] -> w_out act(w_in h + bias) [1, 1, d] (ffn.DenseFFN's layout), or None."""
    if h.numel() != h.shape[-1]:
        return None
    lib = _decode_lib(h, w_in, bias, w_out)
    if lib is None:
        return None
    d, F = w_out.shape
    y = torch.empty_like(h)
    lib.m2d_dense_ffn(h.data_ptr(), y.data_ptr(), w_in.data_ptr(), None if bias is None else bias.data_ptr(),
                      w_out.data_ptr(), int(relu), _dtype_code(h.dtype), d, F, _decode_work(d + 2 * F).data_ptr(),
                      torch.get_num_threads())
    return y


def head(x: torch.Tensor, norm: torch.Tensor | None, eps: float, w: torch.Tensor) -> torch.Tensor | None:
    """x [1, 1, d] -> logits [1, 1, V] float32 = w (w_norm * rmsnorm(x) | x), or None."""
    if x.numel() != x.shape[-1]:
        return None
    lib = _decode_lib(x, norm, w)
    if lib is None:
        return None
    V, d = w.shape
    logits = torch.empty(1, 1, V)
    lib.m2d_head(x.data_ptr(), None if norm is None else norm.data_ptr(), float(eps), w.data_ptr(),
                 _dtype_code(x.dtype), d, V, logits.data_ptr(), _decode_work(2 * d).data_ptr(), torch.get_num_threads())
    return logits
