"""Write a 1B-class Llama GGUF with Q4_K_M's type mix (Q4_K, Q6_K for attn_v,
ffn_down and the tied embedding) and random blocks, reusing the default model's
tokenizer and chat template. Used to check the reference executor holds such a
model within this machine's memory (issue 15); the weights mean nothing.

    python3 scripts/synth_q4km_1b.py SRC.gguf OUT.gguf
"""
import sys

import numpy as np
import gguf

src, out = sys.argv[1], sys.argv[2]
H, L, F, NH, NKV, V = 2048, 16, 8192, 32, 8, 49152  # Llama-3.2-1B shapes, SmolLM2 vocab
HD = H // NH
rng = np.random.default_rng(0)
r = gguf.GGUFReader(src)
w = gguf.GGUFWriter(out, "llama")


def field(name):
    f = r.fields[name]
    return f.contents()


w.add_name("synthetic 1B Q4_K_M (random weights)")
w.add_block_count(L)
w.add_context_length(8192)
w.add_embedding_length(H)
w.add_feed_forward_length(F)
w.add_head_count(NH)
w.add_head_count_kv(NKV)
w.add_rope_freq_base(500000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(V)
w.add_rope_dimension_count(HD)
w.add_tokenizer_model(field("tokenizer.ggml.model"))
w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
w.add_token_list(field("tokenizer.ggml.tokens"))
w.add_token_types(field("tokenizer.ggml.token_type"))
w.add_token_merges(field("tokenizer.ggml.merges"))
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_add_bos_token(False)
w.add_chat_template(field("tokenizer.chat_template"))

Q = gguf.GGMLQuantizationType


def blocks(ty, rows, cols):
    bs, bb = gguf.GGML_QUANT_SIZES[ty]
    n = rows * cols // bs
    b = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)
    d = np.full(n, 0.002, dtype=np.float16).view(np.uint8).reshape(n, 2)
    if ty == Q.Q4_K:  # d, dmin first
        b[:, 0:2] = d
        b[:, 2:4] = d
    elif ty == Q.Q6_K:  # d last
        b[:, bb - 2 : bb] = d
    return b.reshape(rows, cols // bs * bb)


def tensor(name, ty, rows, cols):
    w.add_tensor(name, blocks(ty, rows, cols), raw_dtype=ty)


def norm(name):
    w.add_tensor(name, np.ones(H, dtype=np.float32))


tensor("token_embd.weight", Q.Q6_K, V, H)
norm("output_norm.weight")
for i in range(L):
    p = f"blk.{i}."
    norm(p + "attn_norm.weight")
    norm(p + "ffn_norm.weight")
    tensor(p + "attn_q.weight", Q.Q4_K, H, H)
    tensor(p + "attn_k.weight", Q.Q4_K, NKV * HD, H)
    tensor(p + "attn_v.weight", Q.Q6_K, NKV * HD, H)
    tensor(p + "attn_output.weight", Q.Q4_K, H, H)
    tensor(p + "ffn_gate.weight", Q.Q4_K, F, H)
    tensor(p + "ffn_up.weight", Q.Q4_K, F, H)
    tensor(p + "ffn_down.weight", Q.Q6_K if i % 2 == 0 else Q.Q4_K, H, F)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
