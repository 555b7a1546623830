"""Tiny random-weight configs of the transformers architectures the graph pass is tested on."""

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)

# name -> (config class, overrides, attention implementations to test)
ARCHITECTURES = {
    "llama": (tf.LlamaConfig, dict(num_key_value_heads=2), ("sdpa", "eager")),
    "mistral": (tf.MistralConfig, dict(num_key_value_heads=2, sliding_window=8), ("sdpa",)),
    "qwen2": (tf.Qwen2Config, dict(num_key_value_heads=2), ("sdpa",)),
    "qwen3": (tf.Qwen3Config, dict(num_key_value_heads=2, head_dim=16), ("sdpa",)),
    "gemma": (tf.GemmaConfig, dict(num_key_value_heads=1, head_dim=16), ("sdpa",)),
    "gemma2": (tf.Gemma2Config, dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                     attn_logit_softcapping=1.0, final_logit_softcapping=30.0), ("eager",)),
    "phi": (tf.PhiConfig, dict(partial_rotary_factor=0.5), ("sdpa",)),
    "phi3": (tf.Phi3Config, dict(num_key_value_heads=2, pad_token_id=0), ("sdpa",)),
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128), ("sdpa", "eager")),
    "gpt_neox": (tf.GPTNeoXConfig, dict(rotary_pct=0.25), ("sdpa",)),
    "opt": (tf.OPTConfig, dict(ffn_dim=128, word_embed_proj_dim=64), ("sdpa", "eager")),
    "falcon": (tf.FalconConfig, dict(new_decoder_architecture=False, multi_query=True), ("sdpa",)),
    "gpt_bigcode": (tf.GPTBigCodeConfig, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                              multi_query=True), ("sdpa",)),
    "starcoder2": (tf.Starcoder2Config, dict(num_key_value_heads=2, sliding_window=None), ("sdpa",)),
    # sliding and global layers, q/k norms
    "gemma3": (tf.Gemma3TextConfig, dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention"]), ("sdpa",)),
    "cohere": (tf.CohereConfig, dict(num_key_value_heads=2), ("sdpa",)),          # parallel block, layer norm
    "olmo2": (tf.Olmo2Config, dict(num_key_value_heads=2), ("sdpa",)),            # q/k norm over all heads
    "gptj": (tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8), ("sdpa",)),
    "mixtral": (tf.MixtralConfig, dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
                ("sdpa",)),
    "smollm3": (tf.SmolLM3Config, dict(num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0),
                ("sdpa",)),                                                       # a layer without RoPE
    "llama4_text": (tf.Llama4TextConfig, dict(num_key_value_heads=2, head_dim=16, num_local_experts=1,
                                              interleave_moe_layer_step=1, moe_layers=[], no_rope_layers=[1, 1],
                                              attention_chunk_size=8), ("sdpa",)),   # chunked attention
    "gpt_oss": (tf.GptOssConfig, dict(num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                      sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                ("eager",)),                                                      # learned attention sinks
}


def tiny_model(name: str, impl: str):
    """A tiny random-weight causal LM of architecture ``name`` using attention implementation ``impl``."""
    cls, overrides, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    cfg = cls(**{**COMMON, **overrides})
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def cases():
    return [(name, impl) for name, (_, _, impls) in ARCHITECTURES.items() for impl in impls]
