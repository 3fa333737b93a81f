"""Presets as data: HF DeepseekV3Config fields; unlisted fields take ModelConfig's (DeepSeek-V3's) defaults."""

_YARN_V3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

_CSA, _HCA, _SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
# DeepSeek-V4's shared shape (the released config.json files): one 512-wide KV head with a 64-dim RoPE tail, the
# first 3 layers hash-routed, sqrt(softplus) routing over 256+ experts, YaRN only on the compressed branches
_V4 = dict(
    vocab_size=129280, head_dim=512, qk_rope_head_dim=64, sliding_window=128, num_experts_per_tok=6,
    n_shared_experts=1, scoring_func="sqrtsoftplus", swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20,
    hc_eps=1e-6, index_n_heads=64, index_head_dim=128, o_lora_rank=1024, rope_theta=10000.0,
    compress_rope_theta=160000.0, max_position_embeddings=1048576, num_nextn_predict_layers=1,
    rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                  "beta_fast": 32.0, "beta_slow": 1.0},
)

_TINY = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=320, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, routed_scaling_factor=1.0, max_position_embeddings=1024,
    num_nextn_predict_layers=1,
)

PRESETS: dict[str, dict] = {
    # ~1.8M parameters, most of them the embedding and head: a student for distillation from tiny.
    "nano": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=1.0, max_position_embeddings=1024,
        num_nextn_predict_layers=1,
    ),
    # ~5.4M parameters: the CPU default. V3's shape rules scaled down: q-LoRA, MLA latent and decoupled RoPE key;
    # fine-grained experts a quarter of the hidden size wide (V3: 2048 / 7168), top-4 of 16 within the best 2 of
    # 4 groups, plus a shared expert; a dense first layer as wide as the active experts ((1 + 4) x 64, as V3's
    # 18432 = 9 x 2048); one MTP module.
    "tiny": _TINY,
    # tiny with DeepSeek-V3.2's sparse attention: each query attends to the 64 tokens a 4-head indexer picks, so a
    # quarter of a 256-token pretraining window (V3.2: 2,048 of 128K).
    "tiny-dsa": dict(_TINY, index_n_heads=4, index_head_dim=32, index_topk=64),
    # tiny's widths with DeepSeek-V4's architecture: one KV head of 64 (RoPE on 16 of it), 64-token windows; a
    # sliding-window layer, then CSA (every 4 tokens compressed, a query reads the 16 entries of 64 its indexer
    # picks at 256 tokens: a quarter, as tiny-dsa) and HCA (every 16) alternating; the first layer hash-routed;
    # 4 residual streams.
    "tiny-v4": dict(
        vocab_size=4096, hidden_size=256, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=64,
        layer_types=[_SWA, _CSA, _HCA, _CSA], compress_rates={_CSA: 4, _HCA: 16},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
        index_n_heads=4, index_head_dim=32, index_topk=16, hc_mult=4, hc_sinkhorn_iters=20,
        max_position_embeddings=1024, num_nextn_predict_layers=1,
    ),
    # ~99M parameters, 61M active: one GPU. tiny's proportions, except attention: the GPU presets take V3's own
    # head shapes (latent 512, RoPE key 64, 128 + 64 query/key and 128 value dims per head), the only ones the
    # fast MLA decode kernels serve (FlashMLA, FlashInfer/TRT-LLM and CUTLASS MLA; vLLM accepts no other latent
    # + RoPE width), so a trained model can be served by vLLM and SGLang at full speed.
    "small": dict(
        vocab_size=32768, hidden_size=512, intermediate_size=640, moe_intermediate_size=128,
        num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=1.0, max_position_embeddings=2048,
        num_nextn_predict_layers=1,
    ),
    # ~0.95B parameters, 0.27B active: eight GPUs. 64 experts, top-6 within the best 4 of 8 groups (V3's routing);
    # V3's attention head shapes, as small's (DeepSeek-V2-Lite's 16 heads at half its width).
    "base": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
        num_hidden_layers=16, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=4096,
        num_nextn_predict_layers=1,
    ),
    # DeepSeek-V3 / R1 (671B total, 37B active): inference/configs/config_671B.json and the HF config.json.
    "deepseek-v3": dict(
        rope_scaling=_YARN_V3, max_position_embeddings=163840, num_nextn_predict_layers=1,
    ),
    # DeepSeek-V3.2 (V3.2-Exp, V3.2, V3.2-Speciale): V3 plus DeepSeek Sparse Attention, each query attending to the
    # 2,048 tokens its lightning indexer (64 heads of 128) scores best; transformers' DeepseekV32Config.
    "deepseek-v3.2": dict(
        rope_scaling=_YARN_V3, max_position_embeddings=163840, num_nextn_predict_layers=1,
        index_n_heads=64, index_head_dim=128, index_topk=2048,
    ),
    # DeepSeek-V4-Flash (284B total, 13B active without the embedding): 43 layers, 2 sliding-window only, then CSA
    # and HCA alternating; 64 query heads; experts of 2048.
    "deepseek-v4-flash": dict(
        _V4, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
        moe_intermediate_size=2048, n_routed_experts=256, routed_scaling_factor=1.5, index_topk=512,
        layer_types=[_SWA] * 2 + [_CSA, _HCA] * 20 + [_CSA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
    ),
    # DeepSeek-V4-Pro (1.6T total, 49B active without the embedding): 61 layers, 2 HCA, then CSA and HCA
    # alternating; 128 query heads; 384 experts of 3072.
    "deepseek-v4-pro": dict(
        _V4, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
        moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5, index_topk=1024,
        layer_types=[_HCA] * 2 + [_CSA, _HCA] * 29 + [_CSA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
    ),
    # DeepSeek-V2-Lite (15.7B total, 2.4B active): softmax routing, no query compression.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        scoring_func="softmax", topk_method="greedy", max_position_embeddings=163840,
        rope_scaling={**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001,
    ),
    # Moonshot's Moonlight-16B-A3B: the V3 architecture at V2-Lite scale, no YaRN.
    "moonlight-16b-a3b": dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=2.446, rope_theta=50000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=163584, eos_token_id=163586,
    ),
    # Moonshot's Kimi-K2 (1T total, 32B active): V3 with 64 heads and 384 experts.
    "kimi-k2": dict(
        vocab_size=163840, num_attention_heads=64, n_routed_experts=384, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=2.827, rope_theta=50000.0,
        rope_scaling={**_YARN_V3, "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0},
        max_position_embeddings=131072, bos_token_id=163584, eos_token_id=163585,
    ),
}
