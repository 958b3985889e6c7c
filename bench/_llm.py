"""The LLaMA-like state_dict layout shared by the load, save and scan benchmarks."""

from __future__ import annotations


def llm_config(total_bytes: int):
    """(hidden, intermediate, vocab, kv, layers): LLaMA-like dims whose state_dict is about total_bytes."""
    if total_bytes >= 1_000_000_000:
        h, inter, vocab = 2048, 5632, 32000
    elif total_bytes >= 100_000_000:
        h, inter, vocab = 1024, 2816, 16000
    else:
        h, inter, vocab = 256, 704, 4000
    kv = h // 4
    per_layer = 2 * (h * h + 2 * kv * h + h * h + 3 * inter * h)  # 16-bit weights
    fixed = 2 * 2 * vocab * h  # embed + lm_head, 16-bit
    layers = max(1, int(round((total_bytes - fixed) / per_layer)))
    return h, inter, vocab, kv, layers


def llm_layout(total_bytes: int):
    """[(name, shape, kind)] in state_dict order. kind: "bf16"/"f16"/"f32" random values, "ones"
    float32 ones. Weight matrices alternate bf16, f16, bf16 by layer."""
    h, inter, vocab, kv, layers = llm_config(total_bytes)
    out = [("model.embed_tokens.weight", (vocab, h), "bf16")]
    for i in range(layers):
        dt = ("bf16", "f16", "bf16")[i % 3]
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h), dt),
            (p + "self_attn.q_proj.bias", (h,), "f32"),
            (p + "self_attn.k_proj.weight", (kv, h), dt),
            (p + "self_attn.k_proj.bias", (kv,), "f32"),
            (p + "self_attn.v_proj.weight", (kv, h), dt),
            (p + "self_attn.v_proj.bias", (kv,), "f32"),
            (p + "self_attn.o_proj.weight", (h, h), dt),
            (p + "mlp.gate_proj.weight", (inter, h), dt),
            (p + "mlp.up_proj.weight", (inter, h), dt),
            (p + "mlp.down_proj.weight", (h, inter), dt),
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
        ]
    out += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (vocab, h), "f16")]
    return out
