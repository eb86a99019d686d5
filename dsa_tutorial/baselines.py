"""The torch baselines every kernel is timed against: what one would write in eager torch without a
custom kernel, in the dtype the kernel runs in. Chapters and benchmarks import them from here.

They compute the same thing as the references (the tests check it on the CPU) but are written for
speed in plain torch (batched GEMMs, chunks that bound the temporaries), not to read like the
formula. Where torch has the operation itself (``torch.nn.functional.rms_norm``, ``torch.topk``),
that is the baseline and nothing here wraps it.
"""
from __future__ import annotations

import torch

from .config import ModelArgs

__all__ = ["kv_compress_torch", "apply_rope_torch", "latent_scores_torch", "index_scores_torch",
           "sparse_attention_dense_torch", "sparse_attention_gathered_torch", "mqa_logits_torch",
           "paged_mqa_logits_torch", "sparse_mla_decode_fp8_torch"]


def kv_compress_torch(kv: torch.Tensor, weight: torch.Tensor, args: ModelArgs, positions: torch.Tensor | None = None,
                      freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
    """The official code's eager path after the wkv_a GEMM, kv [T, d_c + d_R]: RMSNorm of c^KV in
    float32, the interleaved rotation of k^R by freqs_cis[positions] (complex [max_seq_len, d_R / 2])
    when positions are given, concatenated again."""
    d_c = args.kv_lora_rank
    c, k_pe = kv[:, :d_c].float(), kv[:, d_c:]
    c_kv = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weight).to(kv.dtype)
    if positions is not None:
        k = torch.view_as_complex(k_pe.float().reshape(-1, k_pe.shape[-1] // 2, 2)) * freqs_cis[positions]
        k_pe = torch.view_as_real(k).flatten(-2).to(kv.dtype)
    return torch.cat([c_kv, k_pe], dim=-1)


def apply_rope_torch(x: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The official `apply_rotary_emb` on x [T, H, d] at positions [T], either layout."""
    shape = x.shape
    if not interleaved:
        x = x.view(*shape[:-1], 2, -1).transpose(-1, -2).contiguous()
    z = torch.view_as_complex(x.float().reshape(*shape[:-1], -1, 2)) * freqs_cis[positions][:, None, :]
    y = torch.view_as_real(z).flatten(-2)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y.to(x.dtype)


def latent_scores_torch(q_abs: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                        softmax_scale: float) -> torch.Tensor:
    """MQA-mode scores over the cache, float32 [B, T, n_h, S]. q_abs [B, T, n_h, d_c], q_rope
    [B, T, n_h, d_R], latent [B, S, d_c + d_R]. float32: the official two einsums; bfloat16: one
    batched GEMM over the whole latent row (cuBLAS tensor cores)."""
    d_c = q_abs.shape[-1]
    if q_abs.dtype == torch.float32:
        return (torch.einsum("bthc,bsc->bths", q_abs, latent[..., :d_c])
                + torch.einsum("bthr,bsr->bths", q_rope, latent[..., d_c:])) * softmax_scale
    q = torch.cat([q_abs, q_rope], dim=-1).flatten(1, 2)  # [B, T n_h, d_c + d_R]
    scores = torch.matmul(q, latent.transpose(1, 2)).float() * softmax_scale  # [B, T n_h, S]
    return scores.view(*q_abs.shape[:3], -1)


def index_scores_torch(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index scores of every (query, key), float32 [T, S]: per `chunk` queries one GEMM q [c H, D] @ k^T
    in q's dtype, then ReLU, times w [T, H] and the head sum in float32. No causal mask."""
    out = torch.empty(q.shape[0], k.shape[0], dtype=torch.float32, device=q.device)
    for t0 in range(0, q.shape[0], chunk):
        logits = (q[t0:t0 + chunk].flatten(0, 1) @ k.T).view(-1, q.shape[1], k.shape[0])  # [c, H, S]
        out[t0:t0 + chunk] = torch.einsum("chs,ch->cs", logits.relu().float(), w[t0:t0 + chunk].float())
    return out


def sparse_attention_dense_torch(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, softmax_scale: float,
                                 d_c: int = 512) -> torch.Tensor:
    """Decode attention over the WHOLE cache with -inf outside the selection: what sparse attention
    costs without a sparse kernel. q [B, n_h, d_c + d_R], kv [B, S, d_c + d_R], mask float [B, 1, S]
    (0 where selected, -inf elsewhere); float32 softmax, GEMMs in kv's dtype. Returns [B, n_h, d_c]."""
    p = torch.softmax(torch.bmm(q, kv.transpose(1, 2)).float() * softmax_scale + mask, dim=-1)
    return torch.bmm(p.to(kv.dtype), kv[..., :d_c])


def sparse_attention_gathered_torch(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, softmax_scale: float,
                                    d_c: int = 512) -> torch.Tensor:
    """Decode attention over the selected latents only: gather the k rows indices [B, k] (all valid),
    then the same two GEMMs and softmax. Returns [B, n_h, d_c]."""
    selected = torch.gather(kv, 1, indices.long()[..., None].expand(-1, -1, kv.shape[-1]))  # [B, k, d_c + d_R]
    p = torch.softmax(torch.bmm(q, selected.transpose(1, 2)).float() * softmax_scale, dim=-1)
    return torch.bmm(p.to(kv.dtype), selected[..., :d_c])


def mqa_logits_torch(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor, ks: torch.Tensor,
                     ke: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The indexer logits of mqa_logits' inputs (q e4m3 [S_q, H, D], kv = (k e4m3 [S_k, D], k_scale
    [S_k]), weights [S_q, H], key ranges ks, ke [S_q]) in bf16 GEMMs, `chunk` queries at a time:
    float32 [S_q, S_k], -inf outside [ks, ke)."""
    k, k_scale = kv
    k = k.to(torch.bfloat16)
    out = torch.empty(q.shape[0], k.shape[0], dtype=torch.float32, device=q.device)
    position = torch.arange(k.shape[0], device=q.device)
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        scores = torch.einsum("thd,sd->ths", q[rows].to(torch.bfloat16), k).float().relu_()  # [c, H, S_k]
        logits = torch.einsum("ths,th->ts", scores, weights[rows].float()) * k_scale.reshape(-1)
        out[rows] = logits.masked_fill((position < ks[rows, None]) | (position >= ke[rows, None]), float("-inf"))
    return out


def paged_mqa_logits_torch(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                           block_table: torch.Tensor, max_context_len: int, chunk: int = 16) -> torch.Tensor:
    """The decode logits of paged_mqa_logits' inputs (q e4m3 [B, next_n, H, D], the uint8 cache
    [num_blocks, block_size, 1, D + 4], weights [B next_n, H], context_lens [B], block_table
    [B, max_blocks]): gather `chunk` sequences' blocks, dequantise to bf16, bf16 GEMMs. float32
    [B next_n, max_context_len]; draft j of sequence b sees positions p <= context_lens[b] - next_n + j."""
    B, next_n, H, D = q.shape
    num_blocks, block_size = kv_cache.shape[:2]
    flat = kv_cache.view(num_blocks, -1)  # a block: block_size D value bytes, then block_size float32 scales
    out = torch.empty(B * next_n, max_context_len, dtype=torch.float32, device=q.device)
    position = torch.arange(block_table.shape[1] * block_size, device=q.device)
    for start in range(0, B, chunk):
        seqs = slice(start, start + chunk)
        blocks = flat[block_table[seqs].long()]  # [c, max_blocks, block_size (D + 4)]
        c = blocks.shape[0]
        k = blocks[..., :block_size * D].reshape(c, -1, D).view(torch.float8_e4m3fn).to(torch.bfloat16)  # [c, L, D]
        k_scale = blocks[..., block_size * D:].contiguous().view(torch.float32).reshape(c, -1)  # [c, L]
        scores = torch.einsum("bnhd,bld->bnhl", q[seqs].to(torch.bfloat16), k).float().relu_()  # [c, next_n, H, L]
        logits = torch.einsum("bnhl,bnh->bnl", scores, weights.view(B, next_n, H)[seqs].float()) * k_scale[:, None]
        limit = context_lens[seqs, None, None] - next_n + torch.arange(next_n, device=q.device)[None, :, None]
        logits = logits.masked_fill(position > limit, float("-inf"))[..., :max_context_len]
        out[start * next_n:(start + c) * next_n] = logits.reshape(c * next_n, -1)
    return out


def sparse_mla_decode_fp8_torch(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                                softmax_scale: float) -> torch.Tensor:
    """Sparse decode over the FP8 latent cache in eager torch: gather the selected 656-byte rows
    (indices [B, s_q, k] into the flattened cache, all valid), dequantise them to bf16
    (latent_cache.dequantize), bf16 GEMMs with a float32 softmax. q [B, s_q, h, 576] bf16;
    returns out [B, s_q, h, 512] bf16."""
    from .latent_cache import D_NOPE, TOKEN_BYTES, dequantize

    B, s_q, h, d_qk = q.shape
    k = indices.shape[-1]
    rows = kv_cache.view(torch.uint8).reshape(-1, TOKEN_BYTES)[indices.reshape(-1).long()]  # [B s_q k, 656]
    kv = dequantize(rows.view(torch.float8_e4m3fn).view(-1, 1, 1, TOKEN_BYTES)).view(B * s_q, k, d_qk)
    p = torch.softmax(torch.bmm(q.reshape(B * s_q, h, d_qk), kv.transpose(1, 2)).float() * softmax_scale, dim=-1)
    return torch.bmm(p.to(kv.dtype), kv[..., :D_NOPE]).view(B, s_q, h, D_NOPE)
