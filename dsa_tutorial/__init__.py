"""DeepSeek Sparse Attention, formula by formula: reference implementations (the specification)
and the loaders of the CUDA kernels in `cuda/`.

Importing this package computes, compiles and prints nothing; import the module you need:

    from dsa_tutorial import norm, kernels, compare, bench

Modules: `config` (ModelArgs), `cost` (bytes and FLOPs), `checks` (input validation),
`compare` (the tolerance helper), `bench` (the timer, ceilings and recorded results), `kernels` (the
CUDA loader), `baselines` (the torch baselines), `figures` (the performance figures), `show` (the
chapters' code listings), `norm` (RMSNorm), and one module per formula family (mla, rope, indexer, topk,
sparse_attention, fp8, paged, latent_cache, train).
"""

__version__ = "0.1.0"
