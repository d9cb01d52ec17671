#!/usr/bin/env python3
"""Writes the header of a full-size DeepSeek-V3 (671B) or Kimi K2 GGUF file, as llama.cpp's
converter lays it out (deepseek2, split attn_k_b/attn_v_b), with Q4_K_M's tensor types, or of
GPT-OSS 120B or 20B (gpt-oss, MXFP4 experts, BF16 elsewhere, as llama.cpp's converter writes
the official checkpoint), and extends the file to its full size as a sparse file: no weight
bytes are written or stored.

`airllm inspect` reads only the header and tensor table, so this gives the plan a real 671B
Q4_K_M file would get, on a machine without 400 GB of disk (issue 25's inspect target). The
weights read as zeros; do not run the file.

    .venv-llamacpp/bin/python bench/sparse_gguf.py /tmp/dsv3-q4km.gguf [--shape kimi-k2]
    airllm inspect -m /tmp/dsv3-q4km.gguf -c 4096 --max-memory 1GiB
    .venv-llamacpp/bin/python bench/sparse_gguf.py /tmp/gpt-oss-120b.gguf --shape gpt-oss-120b
"""
import argparse

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

SHAPES = {
    # hidden, layers, heads, q_lora, kv_lora, nope, rope, v, dense ff, experts, top_k, expert ff,
    # shared, groups, top groups, dense layers, vocab, scaling
    "deepseek-v3": dict(h=7168, n=61, heads=128, q=1536, kv=512, nope=128, rope=64, v=128, ff=18432,
                        e=256, k=8, ex=2048, sh=1, g=8, tg=4, dense=3, vocab=129280, scale=2.5),
    "kimi-k2": dict(h=7168, n=61, heads=64, q=1536, kv=512, nope=128, rope=64, v=128, ff=18432,
                    e=384, k=8, ex=2048, sh=1, g=1, tg=1, dense=1, vocab=163840, scale=2.827),
}


def q4_k_m(cols, more_bits, down_like):
    """The type Q4_K_M gives a matrix of `cols` columns, as llama.cpp's rule: Q6_K for the
    value and down projections of the `use_more_bits` layers, Q4_K elsewhere, and a type with
    smaller blocks where the row is not a whole number of 256-value blocks."""
    t = T.Q6_K if (down_like and more_bits) else T.Q4_K
    if cols % 256 != 0:
        t = T.Q8_0 if t == T.Q6_K else T.Q5_0
    return t


# GPT-OSS: layers, experts (hidden 2880, 64 heads of 64, 8 KV heads, experts of 2880, top-4).
GPT_OSS = {"gpt-oss-120b": (36, 128), "gpt-oss-20b": (24, 32)}


def tensor_info(w, name, shape, qtype):
    # shape in row-major order (rows last but one), as numpy would hold it
    n = int(np.prod(shape))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    w.add_tensor_info(name, shape, np.dtype(np.float32), n // bs * ts, raw_dtype=qtype)


def gpt_oss(w, name):
    n, e = GPT_OSS[name]
    h, heads, kv, hd, ex, vocab = 2880, 64, 8, 64, 2880, 201088
    w.add_name(name)
    w.add_file_type(38)  # MOSTLY_MXFP4_MOE
    w.add_quantization_version(2)
    w.add_context_length(131072)
    w.add_embedding_length(h)
    w.add_block_count(n)
    w.add_feed_forward_length(ex)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(150000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(128)
    w.add_expert_count(e)
    w.add_expert_used_count(4)
    w.add_expert_feed_forward_length(ex)
    w.add_vocab_size(vocab)
    tensor_info(w, "token_embd.weight", [vocab, h], T.BF16)
    for i in range(n):
        b = f"blk.{i}."
        tensor_info(w, b + "attn_norm.weight", [h], T.F32)
        for t, rows in [("attn_q", heads * hd), ("attn_k", kv * hd), ("attn_v", kv * hd)]:
            tensor_info(w, b + t + ".weight", [rows, h], T.BF16)
            tensor_info(w, b + t + ".bias", [rows], T.F32)
        tensor_info(w, b + "attn_output.weight", [h, heads * hd], T.BF16)
        tensor_info(w, b + "attn_output.bias", [h], T.F32)
        tensor_info(w, b + "attn_sinks.weight", [heads], T.F32)
        tensor_info(w, b + "post_attention_norm.weight", [h], T.F32)
        tensor_info(w, b + "ffn_gate_inp.weight", [e, h], T.F32)
        tensor_info(w, b + "ffn_gate_inp.bias", [e], T.F32)
        for t, shape in [("ffn_gate_exps", [e, ex, h]), ("ffn_up_exps", [e, ex, h]), ("ffn_down_exps", [e, h, ex])]:
            tensor_info(w, b + t + ".weight", shape, T.MXFP4)
            tensor_info(w, b + t + ".bias", shape[:2], T.F32)
    tensor_info(w, "output_norm.weight", [h], T.F32)
    tensor_info(w, "output.weight", [vocab, h], T.BF16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="deepseek-v3", choices=sorted(SHAPES) + sorted(GPT_OSS))
    a = ap.parse_args()
    if a.shape in GPT_OSS:
        w = gguf.GGUFWriter(a.out, "gpt-oss")
        gpt_oss(w, a.shape)
        return finish(w, a.out)
    s = SHAPES[a.shape]
    arch = "deepseek2"
    w = gguf.GGUFWriter(a.out, arch)
    w.add_name(a.shape)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    w.add_context_length(163840)
    w.add_embedding_length(s["h"])
    w.add_block_count(s["n"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(1)
    w.add_key_length(s["kv"] + s["rope"])
    w.add_value_length(s["kv"])
    w.add_key_length_mla(s["nope"] + s["rope"])
    w.add_value_length_mla(s["v"])
    w.add_q_lora_rank(s["q"])
    w.add_kv_lora_rank(s["kv"])
    w.add_rope_dimension_count(s["rope"])
    w.add_rope_freq_base(10000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(40.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_log_mul(0.1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(s["vocab"])
    w.add_leading_dense_block_count(s["dense"])
    w.add_expert_count(s["e"])
    w.add_expert_used_count(s["k"])
    w.add_expert_feed_forward_length(s["ex"])
    w.add_expert_shared_count(s["sh"])
    w.add_expert_weights_scale(s["scale"])
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if s["g"] > 1:
        w.add_expert_group_count(s["g"])
        w.add_expert_group_used_count(s["tg"])

    f32 = np.dtype(np.float32)

    def tensor(name, shape, qtype):
        # shape in row-major order (rows last but one), as numpy would hold it
        n = int(np.prod(shape))
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor_info(name, shape, f32, n // bs * ts, raw_dtype=qtype)

    h, n = s["h"], s["n"]
    tensor("token_embd.weight", [s["vocab"], h], T.Q4_K)
    for i in range(n):
        more = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", [h], T.F32)
        tensor(b + "attn_q_a_norm.weight", [s["q"]], T.F32)
        tensor(b + "attn_kv_a_norm.weight", [s["kv"]], T.F32)
        tensor(b + "attn_q_a.weight", [s["q"], h], q4_k_m(h, more, False))
        tensor(b + "attn_q_b.weight", [s["heads"] * (s["nope"] + s["rope"]), s["q"]],
               q4_k_m(s["q"], more, False))
        tensor(b + "attn_kv_a_mqa.weight", [s["kv"] + s["rope"], h], q4_k_m(h, more, False))
        tensor(b + "attn_k_b.weight", [s["heads"], s["kv"], s["nope"]], q4_k_m(s["nope"], more, False))
        tensor(b + "attn_v_b.weight", [s["heads"], s["v"], s["kv"]], q4_k_m(s["kv"], more, True))
        tensor(b + "attn_output.weight", [h, s["heads"] * s["v"]], q4_k_m(s["heads"] * s["v"], more, False))
        tensor(b + "ffn_norm.weight", [h], T.F32)
        if i < s["dense"]:
            tensor(b + "ffn_gate.weight", [s["ff"], h], q4_k_m(h, more, False))
            tensor(b + "ffn_up.weight", [s["ff"], h], q4_k_m(h, more, False))
            tensor(b + "ffn_down.weight", [h, s["ff"]], q4_k_m(s["ff"], more, True))
        else:
            tensor(b + "ffn_gate_inp.weight", [s["e"], h], T.F32)
            tensor(b + "exp_probs_b.bias", [s["e"]], T.F32)
            tensor(b + "ffn_gate_exps.weight", [s["e"], s["ex"], h], q4_k_m(h, more, False))
            tensor(b + "ffn_up_exps.weight", [s["e"], s["ex"], h], q4_k_m(h, more, False))
            tensor(b + "ffn_down_exps.weight", [s["e"], h, s["ex"]], q4_k_m(s["ex"], more, True))
            sh = s["sh"] * s["ex"]
            tensor(b + "ffn_gate_shexp.weight", [sh, h], q4_k_m(h, more, False))
            tensor(b + "ffn_up_shexp.weight", [sh, h], q4_k_m(h, more, False))
            tensor(b + "ffn_down_shexp.weight", [h, sh], q4_k_m(sh, more, True))
    tensor("output_norm.weight", [h], T.F32)
    tensor("output.weight", [s["vocab"], h], T.Q6_K)
    finish(w, a.out)


def finish(w, out):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # The data section: each tensor padded to the alignment, left as a hole.
    align = w.data_alignment
    data = sum((ti.nbytes + align - 1) // align * align for ti in w.tensors[0].values())
    fout = w.fout[0]
    fout.flush()
    start = (fout.tell() + align - 1) // align * align
    fout.truncate(start + data)
    fout.close()
    params = sum(int(np.prod(ti.shape)) for ti in w.tensors[0].values())
    print(f"{out}: {params / 1e9:.1f}B parameters, {(start + data) / 2**30:.1f} GiB (sparse)")


if __name__ == "__main__":
    main()
