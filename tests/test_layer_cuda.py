"""The DSA layer on the GPU (layer_cuda.DSAttentionCUDA): prefill and decode against the reference
layer DSAttention(indexer_fp8=True, latent_cache_fp8=True) at small sizes with DeepSeek-V3.2's
attention dimensions, ragged sequences in a permuted block table, and the decode step replayed from
a CUDA graph. The host checks run everywhere."""
from dataclasses import replace

import pytest
import torch

from dsa_tutorial import checks, compare, layer_cuda
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.layer_cuda import (TOLERANCE, DSAttentionCUDA, PagedDSACache, check_kernel_dims, check_selection,
                                     reference_at, same_sets)
from dsa_tutorial.sparse_attention import DSAttention

# V3.2's attention dimensions (what the kernels serve) around a small model width
ARGS = ModelArgs(dim=512, q_lora_rank=256, index_topk=64)


# ----------------------------------------------------------------------------- host checks (any machine)

def test_kernel_dims_are_v32s():
    check_kernel_dims(ARGS)
    check_kernel_dims(ModelArgs(n_heads=64))
    for bad in (ModelArgs.tiny(), ModelArgs(n_heads=32), ModelArgs(index_n_heads=32), ModelArgs(kv_lora_rank=256)):
        with pytest.raises(ValueError, match="DeepSeek-V3.2's attention dimensions"):
            check_kernel_dims(bad)
    with pytest.raises(ValueError, match="DeepSeek-V3.2's attention dimensions"):
        DSAttentionCUDA(DSAttention(ModelArgs.tiny()))
    with pytest.raises(TypeError, match="must be a DSAttention"):
        DSAttentionCUDA(object())


def test_cache_layout_and_checks():
    cache = PagedDSACache(3, 130, device="cpu")
    assert cache.capacity == 192 and cache.num_blocks == 9
    assert cache.latent.shape == (9, 64, 1, 656) and cache.latent.dtype == torch.float8_e4m3fn
    assert cache.index.shape == (9, 64, 1, 132) and cache.block_table.tolist()[1] == [3, 4, 5]
    # slot of (sequence, position) through the table; positions past the end clip to the last slot
    table = torch.tensor([[4, 0], [1, 3], [2, 5]], dtype=torch.int32)
    cache = PagedDSACache(3, 128, device="cpu", block_table=table)
    assert cache.slots(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 65, 127, 500])).tolist() == \
        [4 * 64, 0 * 64 + 1, 3 * 64 + 63, 5 * 64 + 63]
    with pytest.raises(ValueError, match="block_table"):
        PagedDSACache(3, 128, device="cpu", block_table=torch.tensor([[9, 0], [1, 3], [2, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table"):
        PagedDSACache(3, 200, device="cpu", block_table=table)  # needs 4 blocks a sequence
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            PagedDSACache(bad, 64, device="cpu")
        with pytest.raises(ValueError, match="max_context_len"):
            PagedDSACache(1, bad, device="cpu")


def test_cache_write_read_round_trip():
    """What write() stores read_latents() gives back as latent_cache.latent_round_trip rounds it, and the
    indexer key lands where paged.gather_kv finds it."""
    from dsa_tutorial import fp8, latent_cache, paged

    gen = torch.Generator().manual_seed(0)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    cache = PagedDSACache(1, 128, device="cpu", block_table=table)
    c_kv, k_rope = torch.randn(5, 512, generator=gen), torch.randn(5, 64, generator=gen)
    k_fp8, k_scale = fp8.act_quant(torch.randn(5, 128, generator=gen), 128)
    slots = cache.slots(torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 63, 64, 100]))
    cache.write(slots, c_kv, k_rope, k_fp8, k_scale[:, 0])
    back = cache.read_latents(slots).float()
    want_c, want_r = latent_cache.latent_round_trip(c_kv, k_rope)
    assert torch.equal(back[:, :512], want_c) and torch.equal(back[:, 512:], want_r)
    keys, scales = paged.gather_kv(cache.index, table[0], 128)
    at = torch.tensor([0, 1, 63, 64, 100])
    assert torch.equal(keys[at].view(torch.uint8), k_fp8.view(torch.uint8)) and torch.equal(scales[at], k_scale[:, 0])


# ----------------------------------------------------------------------------- GPU

def _layers(n_heads=128, seed=0):
    torch.manual_seed(seed)
    args = replace(ARGS, n_heads=n_heads)
    reference = DSAttention(args, device="cuda", indexer_fp8=True, latent_cache_fp8=True)
    return reference, DSAttentionCUDA(reference)


@pytest.mark.gpu
@pytest.mark.parametrize("n_heads, query_chunk", [(128, 4096), (64, 64)])
def test_prefill_then_decode_match_the_reference(n_heads, query_chunk, monkeypatch):
    """Ragged prefills (T = 200, 77, 64) into a permuted block table, then decode steps (T = 1, then a
    draft pair T = 2): every output row against the reference at the same selection, every selection a
    valid top-k of the reference's index scores and (almost always) the same set. With query_chunk = 64
    the prefills run their queries in chunks (200 = 64 + 64 + 64 + 8)."""
    monkeypatch.setattr(layer_cuda, "QUERY_CHUNK", query_chunk)
    reference, gpu = _layers(n_heads)
    gen = torch.Generator(device="cuda").manual_seed(1)
    lengths, steps = [200, 77, 64], [1, 1, 2]
    B, k = len(lengths), ARGS.index_topk
    capacity = max(lengths) + sum(steps)
    max_blocks = -(-capacity // 64)
    table = torch.randperm(B * max_blocks, device="cuda", generator=gen).int().view(B, max_blocks)
    cache = PagedDSACache(B, capacity, device="cuda", block_table=table)
    # poison the caches: every slot that is read must have been written
    cache.latent.view(torch.uint8).fill_(0x7F)
    cache.index.fill_(0x7F)
    tokens = [torch.randn(1, L + sum(steps), ARGS.dim, device="cuda", generator=gen) for L in lengths]
    same, checked = [], 0
    with torch.no_grad():
        for b, L in enumerate(lengths):  # the prefills, one sequence each, in an order unlike the table's
            out, aux = gpu.prefill(tokens[b][:, :L], cache, seqs=[b], return_aux=True)
            ref_out, ref_aux = reference(tokens[b][:, :L], topk=k, return_aux=True)
            check_selection(aux["positions"][0], ref_aux["index_scores"][0], min(k, L))
            same.append(same_sets(aux["positions"][0], ref_aux["indices"][0]))
            want = reference_at(reference, tokens[b][:, :L], torch.arange(L), aux["positions"][0])
            compare.assert_close(out[0], want, atol=TOLERANCE["atol_rel"] * float(want.abs().max()),
                                 max_calc_diff=TOLERANCE["max_calc_diff"], name=f"prefill of sequence {b}")
            checked += L
        assert cache.context_lens.tolist() == lengths
        done = list(lengths)
        for T in steps:
            h = torch.cat([tokens[b][:, done[b]:done[b] + T] for b in range(B)])  # [B, T, dim]
            out, aux = gpu.decode(h, cache, return_aux=True)
            for b in range(B):
                h_all = tokens[b][:, :done[b] + T]
                rows = torch.arange(done[b], done[b] + T)
                _, ref_aux = reference(h_all, topk=k, return_aux=True)
                check_selection(aux["positions"][b], ref_aux["index_scores"][0, rows], k)
                same.append(same_sets(aux["positions"][b], ref_aux["indices"][0, rows]))
                want = reference_at(reference, h_all, rows, aux["positions"][b])
                compare.assert_close(out[b], want, atol=TOLERANCE["atol_rel"] * float(want.abs().max()),
                                     max_calc_diff=TOLERANCE["max_calc_diff"], name=f"decode of sequence {b}")
                done[b] += T
                checked += T
            assert cache.context_lens.tolist() == done
    assert checked == sum(lengths) + B * sum(steps)
    assert min(same) >= 0.98, same  # selections differ from the reference's only on float32 near-ties


@pytest.mark.gpu
def test_decode_output_equals_the_reference_layer():
    """Without borrowing the GPU's selection: the decode output against the reference layer's own output
    for the last token (the same top-k set wherever no near-tie decides it)."""
    reference, gpu = _layers()
    gen = torch.Generator(device="cuda").manual_seed(2)
    L, B = 150, 2
    tokens = torch.randn(B, L + 1, ARGS.dim, device="cuda", generator=gen)
    cache = PagedDSACache(B, 256, device="cuda")
    with torch.no_grad():
        gpu.prefill(tokens[:, :L], cache)
        out, aux = gpu.decode(tokens[:, L:], cache, return_aux=True)
        for b in range(B):
            ref_out, ref_aux = reference(tokens[b:b + 1], topk=ARGS.index_topk, return_aux=True)
            if same_sets(aux["positions"][b], ref_aux["indices"][0, L:]) == 1.0:
                compare.assert_close(out[b], ref_out[0, L:], atol=TOLERANCE["atol_rel"] * float(ref_out.abs().max()),
                                     max_calc_diff=TOLERANCE["max_calc_diff"], name=f"sequence {b}")


@pytest.mark.gpu
def test_decode_step_replays_from_a_cuda_graph():
    """The decode step captured once and replayed twice equals two eager steps bit for bit (the same
    kernels on the same data); capture only works because nothing in it waits for the GPU."""
    reference, gpu = _layers()
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, L = 3, 100
    cache = PagedDSACache(B, 192, device="cuda")
    h_prefill = torch.randn(B, L, ARGS.dim, device="cuda", generator=gen)
    h_steps = [torch.randn(B, 1, ARGS.dim, device="cuda", generator=gen) for _ in range(2)]
    with torch.no_grad(), checks.data_checks(False):  # the fast path: no check reads device data
        gpu.prefill(h_prefill, cache)
        state = cache.snapshot()
        eager = [gpu.decode(h, cache).clone() for h in h_steps]
        lens_after = cache.context_lens.clone()
        cache.restore(state)
        h_static = h_steps[0].clone()
        graph, out_static = gpu.capture_decode(h_static, cache)
        assert torch.equal(cache.context_lens, state[2])  # the capture left the cache as it was
        replayed = []
        for h in h_steps:
            h_static.copy_(h)
            graph.replay()
            replayed.append(out_static.clone())
        torch.cuda.synchronize()
    assert torch.equal(cache.context_lens, lens_after)
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)
    assert not torch.equal(replayed[0], replayed[1])


@pytest.mark.gpu
def test_bad_inputs_are_refused_before_any_launch():
    reference, gpu = _layers()
    cache = PagedDSACache(2, 128, device="cuda")
    h = torch.randn(2, 10, ARGS.dim, device="cuda")
    with pytest.raises(ValueError, match="no prefill yet"):
        gpu.decode(h[:, :1], cache)
    with pytest.raises((TypeError, ValueError), match="h"):
        gpu.prefill(h.double(), cache)
    with pytest.raises(ValueError, match="capacity"):
        gpu.prefill(torch.randn(1, 129, ARGS.dim, device="cuda"), cache, seqs=[0])
    with pytest.raises(ValueError, match="distinct sequences"):
        gpu.prefill(h, cache, seqs=[0, 0])
    with pytest.raises(ValueError, match="topk"):
        gpu.prefill(h, cache, topk=0)
    gpu.prefill(h, cache)
    with pytest.raises(ValueError, match="already hold tokens"):
        gpu.prefill(h[:1], cache, seqs=[1])
    with pytest.raises(ValueError, match="T = 1 new token"):
        gpu.decode(h[:, :3], cache)
    with pytest.raises(ValueError, match="every sequence of the cache"):
        gpu.decode(h[:1, :1], cache)
    with pytest.raises(ValueError, match="capacity"):
        gpu.decode(h[:, :1], cache, topk=4096)
    with pytest.raises(ValueError, match="context_lens"):  # data checks on (the suite's DSA_CHECK=1)
        cache.context_lens.fill_(128)
        gpu.decode(h[:, :1], cache)


def test_selection_checks_catch_wrong_selections():
    """check_selection passes a true top-k and names each way a selection can be wrong."""
    scores = torch.tensor([[3.0, 1.0, 2.0, float("-inf")], [0.5, 4.0, -1.0, 2.0]])
    check_selection(torch.tensor([[0, 2, -1], [1, -1, 3]]), scores, 2)
    with pytest.raises(ValueError, match="beats a selected"):
        check_selection(torch.tensor([[0, 1, -1], [1, 3, -1]]), scores, 2)
    with pytest.raises(ValueError, match="want min"):
        check_selection(torch.tensor([[0, -1, -1], [1, 3, -1]]), scores, 2)
    with pytest.raises(ValueError, match="cannot see"):
        check_selection(torch.tensor([[0, 3, -1], [1, 3, -1]]), scores, 2)
    with pytest.raises(ValueError, match="distinct"):
        check_selection(torch.tensor([[0, 0, -1], [1, 3, -1]]), scores, 2)
    assert same_sets(torch.tensor([[0, 2, -1], [1, 3, 0]]), torch.tensor([[2, -1, 0], [1, 3, 2]])) == 0.5


def test_reference_at_is_the_reference_layer_at_its_own_selection():
    """reference_at with the reference's own top-k reproduces DSAttention's output (tiny dims, CPU)."""
    torch.manual_seed(0)
    layer = DSAttention(ModelArgs.tiny(), latent_cache_fp8=True)
    h = torch.randn(1, 40, 64)
    out, aux = layer(h, topk=8, return_aux=True)
    rows = torch.tensor([0, 7, 39])
    assert torch.allclose(reference_at(layer, h, rows, aux["indices"][0, rows]), out[0, rows], atol=1e-6)
