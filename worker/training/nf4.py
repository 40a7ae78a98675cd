"""The 4-bit layers' matmul as plain torch ops, for compiled decoder layers.

bitsandbytes' `Linear4bit` calls its `gemm_4bit` custom op through a Python wrapper that costs
~270 µs of host time per call on an H200 (384 calls a step for Phi-2 with checkpointing: a third
of the default recipe's step, docs/benchmarks.md). Written as torch ops — unpack the two 4-bit
codes of each byte, look them up in the NF4 table, scale each block of 64 by its absmax (itself
8-bit with double quantization), then `linear` — the dequantization is traced into the compiled
layer, where inductor fuses it into one kernel before the matmul, and the wrapper is gone.

The arithmetic is bitsandbytes' own (its default backend, `_dequantize_4bit_compute` and
`_gemm_4bit_default_impl`): float32 codes times float32 scales, cast to the compute dtype; for
more than a few rows bitsandbytes' CUDA path also dequantizes the whole weight and then calls a
normal matmul. The frozen 4-bit weights stay as they are (checkpoints and adapters unchanged).
"""

from __future__ import annotations

import types

import torch

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the absmax of double quantization


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (flat, float32) × the scale of their block; a last, shorter block has its own."""
    n = values.numel()
    full = n - n % blocksize
    scaled = (values[:full].view(-1, blocksize) * scales[: full // blocksize].view(-1, 1)).reshape(-1)
    if full == n:
        return scaled
    return torch.cat([scaled, values[full:] * scales[full // blocksize]])


def block_absmax(state) -> torch.Tensor:
    """The float32 absmax of each block of 64 weights (undoing double quantization)."""
    if not getattr(state, "nested", False):
        return state.absmax.float()
    nested = state.state2
    codes = nested.code[state.absmax.long()]
    return _blockwise(codes, nested.absmax, nested.blocksize or NESTED_BLOCKSIZE) + state.offset


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The weight a bitsandbytes 4-bit parameter stores (`packed`, two codes a byte, the high
    nibble first), as a `dtype` matrix of `state.shape`."""
    rows, columns = state.shape
    codes = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF), dim=-1).reshape(-1)
    values = state.code[codes[: rows * columns].long()]
    return _blockwise(values, block_absmax(state), state.blocksize).view(rows, columns).to(dtype)


def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`bnb.nn.Linear4bit.forward` with the matmul written out (same casts)."""
    state = self.weight.quant_state
    dtype = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    weight = dequantize_4bit(self.weight.data, state, dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def is_4bit_linear(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None and hasattr(
        module, "compute_dtype"
    )


def use_plain_4bit_matmul(model: torch.nn.Module) -> int:
    """Every 4-bit linear layer of `model` computes with `plain_forward`; how many."""
    layers = [m for m in model.modules() if is_4bit_linear(m)]
    for module in layers:
        module.forward = types.MethodType(plain_forward, module)
    return len(layers)


def use_bitsandbytes_matmul(model: torch.nn.Module) -> None:
    """Undo `use_plain_4bit_matmul`."""
    for module in model.modules():
        if is_4bit_linear(module) and "forward" in vars(module):
            del module.forward
