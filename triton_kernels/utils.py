"""Launch heuristics shared by the Triton ops: dtypes, dot precision, tile configs.

Configs are plain dicts keyed on the shape arguments of each op (no autotuning at
call time: the Jacobian op is called once per module and block, and a tuning pass
per new shape would cost more than it saves). Every launcher accepts a ``config``
dict that overrides any of these keys; tests use it to force small or large tiles.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# dtypes the kernels read and write; float64 goes to the torch twin.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and a device Triton can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "Triton kernels need a GPU tensor (or TRITON_INTERPRET=1 for the CPU interpreter); "
            "use the pure-torch functions in linft.ops on CPU"
        )


def compute_dtype(*dtypes: torch.dtype) -> tl.dtype:
    """Dtype the operands of ``tl.dot`` are cast to.

    Half-precision operands stay half (tensor cores, fp32 accumulation) when all
    operands share it; any float32 operand makes the product float32. The CPU
    interpreter stores bfloat16 as raw uint16 bits and only converts it correctly
    to and from float32, so there everything is computed in float32.
    """
    if interpreting() or any(d == torch.float32 for d in dtypes) or len(set(dtypes)) > 1:
        return tl.float32
    return _TL_DTYPES[dtypes[0]]


def dot_precision(dtype: torch.dtype, requested: str | None) -> str:
    """``input_precision`` of float32 products.

    float32 inputs default to ``"ieee"`` (true fp32, as the API's ``precision="fp32"``
    promises: tf32 off); ``"tf32x3"`` is close to fp32 at tensor-core speed, ``"tf32"``
    is what ``precision="tf32"`` asks for. Half inputs whose product is formed in fp32
    (one factor computed in registers) use ``"tf32"``: a bf16/fp16 value is exact in
    tf32, so only the register factor is rounded (to 10 mantissa bits, better than
    rounding it to bf16).
    """
    if requested is not None:
        if requested not in DOT_PRECISIONS:
            raise ValueError(f"input_precision must be one of {DOT_PRECISIONS}, got {requested!r}")
        return requested
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in on the interpreter)."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def jacobian_config(
    m: int, n: int, k_proj: int, tokens: int, dtype: torch.dtype, projected: bool
) -> dict:
    """Tiles of the token-sum kernel ``out[m, n] = sum_t L[t, m] R[t, n]``.

    m, n: the output block (one of them is the LoRA rank r when ``projected``);
    k_proj: the feature dimension contracted with A or B in registers (0 if none);
    tokens: T. The rank side is covered by one tile (r <= 64 typically) so the
    small product ``A x_t`` / ``B^T g_t`` is formed once per token tile.
    """
    if interpreting():
        # Small tiles: the interpreter's cost is per element, and tests then
        # cover several tiles along every axis.
        return {
            "BLOCK_T": 16,
            "BLOCK_M": 16,
            "BLOCK_N": 16,
            "BLOCK_K": 16,
            "num_warps": 1,
            "num_stages": 1,
        }
    half = dtype != torch.float32
    block_t = _pow2(tokens, 16, 64 if half else 32)
    if projected:
        # The wide side (d_in or d_out) is tiled; each tile recomputes the rank-r
        # factor, so wider tiles mean less recomputation (and g or x re-read from L2).
        rank = min(m, n)
        block_r = _pow2(rank, 16, 64)
        block_wide = _pow2(max(m, n), 16, 256 if block_r <= 32 else 128)
        bm, bn = (block_r, block_wide) if m <= n else (block_wide, block_r)
        return {
            "BLOCK_T": block_t,
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": 64 if half else 32,
            "num_warps": 8 if block_wide >= 256 else 4,
            "num_stages": 3,
        }
    # plain dW = G^T X: a GEMM with K = T, output-write bound for typical T.
    bm = _pow2(m, 16, 128)
    bn = _pow2(n, 16, 128)
    return {
        "BLOCK_T": block_t,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": 16,
        "num_warps": 8 if bm * bn >= 128 * 128 else 4,
        "num_stages": 3,
    }


def _gram_cfg(bm, bn, bk, group, warps, stages, split=1, reduce_block=64) -> dict:
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": group,
        "SPLIT_K": split,
        # square tiles of the split-K sum; 64 x 64 fp32 over 4 warps stays in registers
        # (128 x 128 spilled when compiled for sm_90: benchmarks/kernel_resources.py)
        "REDUCE_BLOCK": reduce_block,
        "num_warps": warps,
        "num_stages": stages,
    }


def gram_config(
    m: int,
    k: int,
    p: int,
    dtype: torch.dtype,
    int8: bool,
    symmetric: bool,
    device: torch.device,
    load_bytes: int = 2,
) -> dict:
    """Tiles of ``out[m, k] = a[m, P] b[k, P]^T`` with split-K over P.

    dtype: the dot's operand dtype; load_bytes: element size of the inputs as
    stored (the sign kernels read bf16/fp32 and convert in registers).
    P (the number of parameters) is long and m, k (samples x outputs of a block)
    are small, so the output alone has too few tiles to fill the GPU: the P axis is
    split into ``SPLIT_K`` slices whose fp32 partial tiles are summed in a fixed
    order by a second pass (deterministic, unlike atomics, and it keeps the
    symmetric result exactly symmetric).
    """
    if interpreting():
        return _gram_cfg(16, 16, 32, group=2, warps=1, stages=1, split=1, reduce_block=16)
    if int8:
        cfg = _gram_cfg(128, 128, 128 // max(1, load_bytes // 2), group=8, warps=8, stages=4)
    elif dtype == torch.float32:
        # fp32 FMA tiles: 8 warps keep 16 accumulators a thread (4 warps spilled on sm_90)
        cfg = _gram_cfg(64, 64, 32, group=8, warps=8, stages=3)
    else:
        cfg = _gram_cfg(128, 128, 64, group=8, warps=8, stages=4)
    if max(m, k) <= 64:
        fp32_fma = dtype == torch.float32 and not int8
        cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=8 if fp32_fma else 4)
    if symmetric:
        cfg["BLOCK_N"] = cfg["BLOCK_M"]
    # stay within ~160 KiB of pipelined shared memory (H100/H200 have 227 KiB per block)
    stage_bytes = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * load_bytes
    cfg["num_stages"] = max(2, min(cfg["num_stages"], (160 * 1024) // stage_bytes))
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    tiles_n = triton.cdiv(k, cfg["BLOCK_N"])
    tiles = tiles_m * (tiles_m + 1) // 2 if symmetric else tiles_m * tiles_n
    sms = num_sms(device.index if device.index is not None else 0)
    split = triton.cdiv(2 * sms, tiles)
    # keep every slice at least 16 K-steps long
    split = max(1, min(split, p // (16 * cfg["BLOCK_K"]), 64))
    cfg["SPLIT_K"] = split
    return cfg


def merge_config(default: dict, override: dict | None) -> dict:
    """``default`` updated with the caller's keys; unknown keys are an error."""
    if not override:
        return default
    unknown = set(override) - set(default)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(default)}")
    return {**default, **override}
