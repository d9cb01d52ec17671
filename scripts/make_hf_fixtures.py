#!/usr/bin/env python3
"""Builds the tiny random-weight Hugging Face model folders under tests/fixtures/hf/ and records
transformers' outputs on them, which the Rust tests compare against.

Each folder holds config.json, safetensors weights, tokenizer.json, tokenizer_config.json,
generation_config.json, and:
  reference.json         prompts, their token ids (transformers' tokenizer), 16 greedy tokens each
  reference.safetensors  logits_0, logits_1: transformers' logits for every prompt token, computed
                         for both prompts in one right-padded batch

Reference math is float32 (float64 for mixture-of-experts models). For the bf16 checkpoint the
reference is the bf16 weights widened to float32, which is exactly what the engine computes with on
CPU; for the block-FP8 checkpoints it is the plain model on the dequantized weights, q.float() * scale.

Versions are pinned in scripts/requirements-fixtures.txt. Run:
    python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install -r scripts/requirements-fixtures.txt
    .venv-fixtures/bin/python scripts/make_hf_fixtures.py
"""
import json
import os
import re
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")

CORPUS = """The quick brown fox jumps over the lazy dog. A layer is read from disk, computed for the
whole batch, and dropped while the next one is already being read. Streaming lets a small machine run
a model far larger than its memory. Once upon a time there was a little model that wanted to talk.
It read one page at a time, and every page taught it something new about the world. Numbers like
12, 345 and 6789 appear too, as do tabs\tand new lines.
Café, naïve, résumé; 東京 and 😊 are rare but possible.
""" * 4

SPECIALS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PROMPTS = [
    "Once upon a time there was a little model that wanted to read every page of the world",
    "The quick brown fox",
]


def build_tokenizer(bos_post_processor: bool, specials=SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def randomize(model, std=0.15, embed_std=0.5):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                # Routers: a wide spread, so no token sits near a tie between its k-th and
                # (k+1)-th expert, where float rounding could flip the choice.
                p.copy_(1.0 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def to_old_keys(cfg: dict) -> dict:
    """Rewrites a transformers-5 config.json in the transformers-4 style."""
    out = dict(cfg)
    rp = out.pop("rope_parameters", None)
    if rp:
        rp = dict(rp)
        out["rope_theta"] = rp.pop("rope_theta")
        kind = rp.get("rope_type", "default")
        if kind == "default":
            out["rope_scaling"] = None
        else:
            # transformers 4 wrote `type` for older scalings; keep both spellings covered.
            if kind == "linear":
                rp["type"] = rp.pop("rope_type")
            out["rope_scaling"] = rp
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def randomize_score_bias(model, std=0.5):
    """DeepSeek-V3 / GLM-4.5 routers keep `e_score_correction_bias` as a buffer, which randomize()
    (parameters only) leaves at zero: give it random values so the checkpoint exercises it."""
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(std * torch.randn(b.shape, generator=g))


def soften_softmax_router(model, scale=0.25, seed=3):
    """randomize()'s router spread saturates a softmax over 8 experts (every weight past the first is
    near 0, and choices among them near-ties): redraw softmax-scored routers narrower, from a seed
    picked so no token's choice is near a tie (see router_gaps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(scale * torch.randn(p.shape, generator=g))


FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_fp8_block(w, dtype, block):
    """Block-wise FP8 as in DeepSeek-V3's checkpoints: one float32 scale per [br, bc] block (edge
    blocks partial), scale = amax(|block|) / fp8_max, q = w / scale. Returns the fp8 weight, the
    `weight_scale_inv` grid (the scale itself: w ≈ q * scale_inv) and the dequantized float32 weight,
    q.float() * scale_inv, which is what the reference runs on."""
    br, bc = block
    rows, cols = w.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    w = w.float()
    scale = torch.empty(gr, gc, dtype=torch.float32)
    for i in range(gr):
        for j in range(gc):
            amax = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max()
            scale[i, j] = amax / FP8_MAX[dtype] if amax > 0 else 1.0
    full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    q = (w / full).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    deq = q.float() * full
    return q, scale, deq


def router_gaps(model):
    """Forward hooks on the DeepSeek/GLM-4.5 group-limited routers that record the smallest gap, in
    float64, between the last chosen and first rejected group, and the last chosen and first rejected
    expert (in scores for sigmoid routers, in logits for softmax ones), so a near-tie that float
    rounding could flip shows up when the fixture is made."""
    gaps = {"group": float("inf"), "expert": float("inf")}

    def hook(mod, args, _out):
        h = args[0].reshape(-1, mod.hidden_dim).double()
        logits = h @ mod.weight.double().t()
        ng, e = mod.num_group, mod.num_experts
        if hasattr(mod, "e_score_correction_bias"):  # DeepSeek-V3 / GLM-4.5: sigmoid + bias, top-2 sum
            s = logits.sigmoid() + mod.e_score_correction_bias.double()
            gs = s.view(-1, ng, e // ng).topk(2, dim=-1)[0].sum(-1)
            fill = float("-inf")
        else:  # DeepSeek-V2: softmax, group max (or plain greedy); gaps in logits, which the softmax keeps in order
            s = logits
            gs = s.view(-1, ng, e // ng).max(-1).values if mod.topk_method == "group_limited_greedy" else None
            fill = float("-inf")
        if gs is not None and mod.topk_group < ng:
            srt = gs.sort(-1, descending=True).values
            gaps["group"] = min(gaps["group"], float((srt[:, mod.topk_group - 1] - srt[:, mod.topk_group]).min()))
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(mod.topk_group, -1)[1], 1.0)
            s = s.masked_fill(~keep.repeat_interleave(e // ng, 1).bool(), fill)
        srt = s.sort(-1, descending=True).values
        gaps["expert"] = min(gaps["expert"], float((srt[:, mod.top_k - 1] - srt[:, mod.top_k]).min()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "num_group") and hasattr(m, "top_k")]
    return gaps, handles


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_codes(w):
    """MXFP4 as OCP defines it, along the last axis of w: per block of 32 values one e8m0 exponent
    (the smallest with amax / 2^e <= 6) and e2m1 codes, each value's nearest (ties to the lower
    code). Returns (codes uint8 [..., K], biased exponents uint8 [..., K / 32])."""
    b = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = b.abs().amax(-1)
    e = torch.ceil(torch.log2(amax.clamp_min(2.0**-100) / 6.0)).clamp(-127, 127)
    scaled = b / torch.pow(2.0, e)[..., None]
    idx = (scaled.abs()[..., None] - FP4_VALUES[:8]).abs().argmin(-1)
    codes = torch.where((scaled < 0) & (idx > 0), idx + 8, idx)
    return codes.to(torch.uint8).reshape(w.shape), (e + 127).to(torch.uint8)


def mxfp4_values(codes, exps):
    v = FP4_VALUES[codes.long()].reshape(*codes.shape[:-1], -1, 32)
    return (v * torch.pow(2.0, exps.float() - 127)[..., None]).reshape(codes.shape)


def gpt_oss_post(model):
    """GPT-OSS: routers with a wide spread (see randomize), gate/up scaled up so that the SwiGLU's
    clamp at 7 is reached, and every expert weight rounded to MXFP4, so the float model is exactly
    the one its MXFP4 checkpoint holds."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            if name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                if name.endswith("gate_up_proj"):
                    p.mul_(4.0)
                # [experts, in, out] as transformers holds them; blocks run along `in`.
                t = p.transpose(1, 2)
                c, e = mxfp4_codes(t)
                p.copy_(mxfp4_values(c, e).transpose(1, 2))


def mxfp4_checkpoint(out):
    """Rewrites out/model.safetensors with the experts in MXFP4 as openai/gpt-oss ships them:
    `*_blocks` [experts, out, in / 32, 16] (value 2k in byte k's low nibble, 2k + 1 in its high one)
    and `*_scales` [experts, out, in / 32], and adds its quantization_config."""
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    stored = {}
    for k, w in weights.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            c, e = mxfp4_codes(w.transpose(1, 2).contiguous())
            packed = c[..., 0::2] | (c[..., 1::2] << 4)
            stored[k + "_blocks"] = packed.reshape(*c.shape[:-1], -1, 16).contiguous()
            stored[k + "_scales"] = e.contiguous()
        else:
            stored[k] = w
    save_file(stored, path, metadata={"format": "pt"})
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


HARMONY_SPECIALS = SPECIALS + ["<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|constrain|>", "<|call|>"]


# llama-cpp-python 0.3.36's sdist on PyPI (the version scripts/requirements-llamacpp.txt pins).
LLAMA_CPP_SDIST = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    "llama_cpp_python-0.3.36.tar.gz"
)


def gpt_oss_template():
    """The harmony chat template (openai/gpt-oss's chat_template.jinja), as llama.cpp ships it in
    models/templates/, from the pinned llama-cpp-python sdist on PyPI (no model hub is needed)."""
    import io
    import tarfile
    import urllib.request

    data = urllib.request.urlopen(LLAMA_CPP_SDIST).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        m = next(m for m in t.getmembers() if m.name.endswith("models/templates/openai-gpt-oss-120b.jinja"))
        return t.extractfile(m).read().decode()


GPT_OSS_CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4", "thinking": "Two plus two is four."},
    {"role": "user", "content": "And 3 + 3?"},
]


def quantize_checkpoint(out, fp8_dtype, block, pick):
    """Rewrites out/model.safetensors with the weights `pick` selects in block FP8 and adds the
    quantization_config that DeepSeek-V3's official config.json carries. Returns a temporary folder
    holding the unquantized config and the dequantized float32 weights, for the reference."""
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    stored, deq = {}, {}
    for k, w in weights.items():
        if pick(k):
            assert k.endswith(".weight") and w.dim() == 2, k
            q, scale_inv, d = quantize_fp8_block(w, fp8_dtype, block)
            stored[k] = q.contiguous()
            stored[k + "_scale_inv"] = scale_inv.contiguous()
            deq[k] = d.contiguous()
        else:
            stored[k] = w
            deq[k] = w
    src = out.rstrip("/") + ".dequantized.tmp"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(out, src)
    save_file(deq, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    save_file(stored, path, metadata={"format": "pt"})
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}[fp8_dtype],
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return src


def make(name, arch, extra, *, tie, bos_post, add_bos, dtype=torch.float32, shard=None, old_keys=False, chat=False,
         f64=False, post=None, fp8=None, mxfp4=False, specials=SPECIALS, template=CHAT_TEMPLATE, chat_messages=None,
         chat_kwargs=None, noise=False, prompts=None):
    """post: called on the randomized model before it is saved (e.g. randomize_score_bias).
    fp8: (torch fp8 dtype, [br, bc], predicate on tensor names): those weights are stored block-quantized
    (weight + weight_scale_inv, quantization_config in config.json) and the reference runs the plain
    model on the dequantized weights."""
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tok = build_tokenizer(bos_post, specials)
    tok.save(os.path.join(out, "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": add_bos,
        "model_max_length": 4096,
    }
    if chat:
        tc["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)

    cfg_cls = transformers.AutoConfig.for_model
    base = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
        tie_word_embeddings=tie,
    )
    base.update(extra)
    config = cfg_cls(arch, **base)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    randomize(model)
    if post:
        post(model)
    if tie:
        model.tie_weights()
    model.eval()

    # Save in the checkpoint dtype, then compute the reference from exactly the saved weights.
    model.to(dtype).save_pretrained(out, max_shard_size=shard or "5GB")
    src = out
    if fp8:
        src = quantize_checkpoint(out, *fp8)
    if mxfp4:
        mxfp4_checkpoint(out)
    if f64:
        # Mixture-of-experts references are the exact function, computed in float64 with the
        # per-expert loop: transformers' f32 grouped-matmul path is itself up to ~1e-4 off it.
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
        ).double().eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager").float().eval()
    if src != out:
        shutil.rmtree(src)
    if old_keys:
        p = os.path.join(out, "config.json")
        with open(p) as f:
            cfg = json.load(f)
        with open(p, "w") as f:
            json.dump(to_old_keys(cfg), f, indent=2)

    hf_tok = AutoTokenizer.from_pretrained(out)
    prompts = prompts or PROMPTS
    ids = [hf_tok(p)["input_ids"] for p in prompts]
    lens = [len(i) for i in ids]
    width = max(lens)
    pad = tok.token_to_id("<pad>")
    batch = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits
        tensors = {f"logits_{b}": logits[b, : lens[b]].float().contiguous() for b in range(len(ids))}
        gaps, handles = router_gaps(model)
        greedy = []
        margins = []
        for i in ids:
            seq = list(i)
            for _ in range(16):
                last = model(input_ids=torch.tensor([seq])).logits[0, -1]
                top = torch.topk(last, 2).values
                margins.append(float(top[0] - top[1]))
                seq.append(int(last.argmax()))
            greedy.append(seq[len(i):])
        for h in handles:
            h.remove()
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    f32_noise = None
    if noise:
        # How far transformers' own float32 run lands from the float64 reference: for models whose
        # tiny random form is badly conditioned (GPT-OSS's), the bound an f32 engine can meet.
        m32 = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
        ).eval()
        with torch.no_grad():
            l32 = m32(input_ids=batch, attention_mask=mask).logits
        f32_noise = max(float((l32[b, : lens[b]] - tensors[f"logits_{b}"]).abs().max()) for b in range(len(ids)))
    ref = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompts": prompts,
        "prompt_token_ids": ids,
        "greedy_token_ids": greedy,
        "min_greedy_margin": min(margins),
    }
    if f32_noise is not None:
        ref["transformers_f32_max_abs_diff"] = f32_noise
    if chat:
        msgs = chat_messages or [{"role": "user", "content": "Hello there"}]
        ref["chat_messages"] = msgs
        kw = dict(chat_kwargs or {})
        if "today" in kw:
            # A fixed date for templates that print today's (harmony's "Current date"), which the
            # test sets on its side too.
            today = kw.pop("today")
            kw["chat_template"] = template.replace('strftime_now("%Y-%m-%d")', json.dumps(today))
            ref["chat_today"] = today
        ref["chat_kwargs"] = {k: v for k, v in kw.items() if k != "chat_template"}
        ref["chat_token_ids"] = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
        if not isinstance(ref["chat_token_ids"], list):
            ref["chat_token_ids"] = list(ref["chat_token_ids"]["input_ids"])
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(f"{name}: prompt lengths {lens}, min greedy margin {min(margins):.4f}", file=sys.stderr)
    if handles:
        print(f"{name}: min router gap: group {gaps['group']:.4g}, expert {gaps['expert']:.4g}", file=sys.stderr)


def main():
    only = set(sys.argv[1:])
    global make
    full_make = make

    def make(name, *a, **k):  # noqa: F811 - filter by the names given on the command line
        if not only or name in only:
            full_make(name, *a, **k)

    make(
        "llama-gqa2-llama3rope",
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
        tie=False,
        bos_post=True,
        add_bos=True,
    )
    make(
        "llama-mqa-tied-linear-bf16",
        "llama",
        dict(
            num_key_value_heads=1,
            attention_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
        tie=True,
        bos_post=False,
        add_bos=True,
        dtype=torch.bfloat16,
        old_keys=True,
    )
    make(
        "mistral-sliding-window",
        "mistral",
        dict(sliding_window=5, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        tie=False,
        bos_post=True,
        add_bos=True,
    )
    make(
        "qwen2-bias-mha-sharded",
        "qwen2",
        dict(num_key_value_heads=4, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
        tie=True,
        bos_post=False,
        add_bos=False,
        shard="60KB",
        old_keys=True,
    )
    make(
        "qwen3-qknorm-headdim",
        "qwen3",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        tie=False,
        bos_post=False,
        add_bos=False,
        chat=True,
    )


    make(
        "gemma3-sliding-global",
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
            hidden_activation="gelu_pytorch_tanh",
        ),
        tie=True,
        bos_post=True,
        add_bos=True,
    )
    make(
        "gemma2-softcap-alternating",
        "gemma2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            # Small caps, so the tanh bends the random model's scores and logits.
            attn_logit_softcapping=2.0,
            final_logit_softcapping=10.0,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            hidden_activation="gelu_pytorch_tanh",
        ),
        tie=True,
        bos_post=True,
        add_bos=True,
    )
    make(
        "mixtral-moe",
        "mixtral",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=96,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        tie=False,
        bos_post=True,
        add_bos=True,
        f64=True,
    )
    make(
        "qwen2moe-shared-expert",
        "qwen2_moe",
        dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            norm_topk_prob=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        tie=False,
        bos_post=False,
        add_bos=False,
        f64=True,
    )
    make(
        "qwen3moe-dense-layer",
        "qwen3_moe",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        tie=False,
        bos_post=False,
        add_bos=False,
        f64=True,
    )
    make(
        "qwen3moe-sparse",
        "qwen3_moe",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        tie=True,
        bos_post=True,
        add_bos=True,
        f64=True,
    )
    # Phi-3: fused qkv_proj and gate_up_proj, partial rotary, LongRoPE. (Named without "phi3":
    # llama.cpp gives models of that name tokenizer attributes for tokens this vocabulary lacks.) The original context is
    # 8 tokens, so every prompt runs on the long factors and the attention factor of a 32×
    # extension (max_position_embeddings 256), as in transformers past the original context.
    make(
        "phi-three-longrope-partial",
        "phi3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            original_max_position_embeddings=8,
            sliding_window=None,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                partial_rotary_factor=0.5,
                original_max_position_embeddings=8,
                short_factor=[1.0, 1.3, 1.9, 2.6],
                long_factor=[1.1, 2.4, 5.3, 11.0],
            ),
            partial_rotary_factor=0.5,
        ),
        tie=False,
        bos_post=True,
        add_bos=True,
    )

    # DeepSeek-V2: MLA with a plain q_proj (no q LoRA), v_head_dim unlike qk_nope_head_dim, softmax
    # routing with group-limited greedy selection (group score = its best expert; 3 experts from the
    # best 2 of 4 groups), no renormalization
    # (V2 ignores norm_topk_prob) and routed_scaling_factor on the top-k weights; one shared expert.
    make(
        "deepseek-v2-mla-grouped",
        "deepseek_v2",
        DEEPSEEK_V2,
        tie=False,
        bos_post=True,
        add_bos=True,
        f64=True,
        post=soften_softmax_router,
    )
    # DeepSeek-V2-Lite's shape, small: no query LoRA, softmax routing without groups, and 27 layers,
    # the count by which llama.cpp's runtime takes a deepseek2 file without q_lora_rank to be a
    # V2-Lite (so that its GGUF form, made by llama.cpp's converter, loads there).
    make(
        "deepseek-v2-lite-27l",
        "deepseek_v2",
        dict(
            DEEPSEEK_V2,
            hidden_size=32,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=2,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            rms_norm_eps=1e-6,
        ),
        tie=False,
        bos_post=True,
        add_bos=True,
        f64=True,
        post=soften_softmax_router,
    )
    # DeepSeek-V3: MLA with q LoRA, sigmoid routing with e_score_correction_bias for the choice only,
    # group score = sum of its top-2, renormalized top-k times routed_scaling_factor, YaRN with
    # mscale_all_dim (softmax scale × mscale²), rope_interleave.
    make(
        "deepseek-v3-mla-noaux-yarn",
        "deepseek_v3",
        DEEPSEEK_V3_YARN,
        tie=False,
        bos_post=False,
        add_bos=False,
        f64=True,
        post=randomize_score_bias,
    )
    # GLM-4.5 (Glm4MoeForCausalLM): partial rotary (half-split, first half of each head), q/k/v bias,
    # per-head q/k RMSNorm, DeepSeek-V3-style sigmoid router with e_score_correction_bias.
    make(
        "glm4moe-partial-rotary",
        "glm4_moe",
        dict(
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            intermediate_size=96,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
        tie=False,
        bos_post=True,
        add_bos=True,
        f64=True,
        post=randomize_score_bias,
    )
    # GLM-4-0414 dense (Glm4ForCausalLM): partial rotary on interleaved pairs of the first half of each
    # head, q/k/v bias, fused gate_up_proj, extra post_self_attn / post_mlp RMSNorms.
    make(
        "glm4-dense",
        "glm4",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            partial_rotary_factor=0.5,
            attention_bias=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
        tie=False,
        bos_post=False,
        add_bos=False,
    )
    # Block-FP8 checkpoints (DeepSeek-V3's format: weight in fp8, weight_scale_inv one f32 per block,
    # quantization_config.weight_block_size). The references run the plain model on the dequantized
    # weights. [32, 48] leaves partial edge blocks in both directions.
    make(
        "qwen3-fp8-block",
        "qwen3",
        QWEN3_FP8,
        tie=False,
        bos_post=False,
        add_bos=False,
        fp8=(torch.float8_e4m3fn, [32, 48], is_layer_matrix),
    )
    make(
        "qwen3-fp8-e5m2",
        "qwen3",
        dict(QWEN3_FP8, num_hidden_layers=4),
        tie=False,
        bos_post=True,
        add_bos=True,
        fp8=(torch.float8_e5m2, [16, 16], is_layer_matrix),
    )
    make(
        "deepseek-v3-fp8-block",
        "deepseek_v3",
        dict(DEEPSEEK_V3_YARN, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        tie=False,
        bos_post=True,
        add_bos=True,
        f64=True,
        post=randomize_score_bias,
        fp8=(torch.float8_e4m3fn, [32, 32], is_layer_matrix),
    )
    if not only or only & {"gpt-oss-mxfp4", "gpt-oss-bf16-experts"}:
        gpt_oss_fixtures()
    hybrid_fixtures(make)


# Longer than one 64-token chunk of the delta rule, so that prefill runs the chunked form over a
# whole chunk and a partial one, and the second prompt stays within one chunk.
LONG_PROMPTS = [
    "Once upon a time there was a little model that wanted to read every page of the world. It read "
    "one page at a time, and every page taught it something new.",
    "The quick brown fox",
]


def offset_norms(model):
    """Qwen3-Next's and Qwen3.5's RMSNorms scale by (1 + w): randomize() put their weights near 1,
    which would double every norm (and so quadruple the attention scores through q_norm and k_norm);
    near 0 their scale is near 1 as in the other fixtures. The gated norm is a plain scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                p.sub_(1.0)


def exact_f64():
    """transformers' delta rule and Qwen's RMSNorms compute in float32 whatever the model's dtype;
    for a float64 reference they are rebuilt from their own source with float64 in place of
    float32 (and .float() as .double())."""
    import inspect
    import textwrap
    from transformers.models.qwen3_5 import modeling_qwen3_5
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
    from transformers.models.qwen3_next import modeling_qwen3_next

    def rebuild(fn, env):
        src = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
        src = "\n".join(l for l in src.split("\n") if not l.startswith("@"))
        src = src.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
        scope = {}
        exec(src, env, scope)
        return next(iter(scope.values()))

    for mod in (modeling_qwen3_next, modeling_qwen3_5, modeling_qwen3_5_moe):
        env = vars(mod)
        for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
            setattr(mod, name, rebuild(getattr(mod, name), env))
        for cls in vars(mod).values():
            if isinstance(cls, type) and cls.__name__.endswith(("RMSNorm", "RMSNormGated")):
                for meth in ("forward", "_norm"):
                    if meth in vars(cls):
                        setattr(cls, meth, rebuild(vars(cls)[meth], env))


def hybrid_fixtures(make):
    """Gated DeltaNet hybrids: Qwen3-Next (fused, per-key-head qkvz/ba projections, a dense layer
    among the sparse ones), Qwen3.5-MoE (separate qkv/z/b/a, as many value heads as key heads) and
    the dense Qwen3.5. Three linear layers to a full one with an output gate and partial rotary. The
    references are float64 throughout (see exact_f64), and record how far transformers' own float32
    run lands from them."""
    exact_f64()
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
                  linear_num_key_heads=2, linear_num_value_heads=4)
    attn = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=48)
    common = dict(f64=True, prompts=LONG_PROMPTS, noise=True, post=offset_norms)
    make("qwen3next-hybrid", "qwen3_next",
         dict(**linear, **attn, **moe, norm_topk_prob=True, mlp_only_layers=[1],
              layer_types=["linear_attention"] * 3 + ["full_attention"]),
         tie=False, bos_post=False, add_bos=False, **common)
    make("qwen3_5moe-hybrid", "qwen3_5_moe_text",
         dict(linear, linear_num_value_heads=2, linear_value_head_dim=16, **attn, **moe,
              layer_types=["linear_attention", "full_attention"] * 2),
         tie=True, bos_post=True, add_bos=True, **common)
    # With attention_bias, q_proj's bias covers the gate rows as well as the queries.
    make("qwen3_5-dense-hybrid", "qwen3_5_text",
         dict(**linear, **attn, num_hidden_layers=4, attention_bias=True,
              layer_types=["linear_attention"] * 3 + ["full_attention"]),
         tie=False, bos_post=False, add_bos=False, **common)


def gpt_oss_fixtures():
    """GPT-OSS: MXFP4 experts (as shipped, and dequantized as some repos publish them), sinks,
    sliding windows of 4 on alternate layers, YaRN without truncation, the clamped SwiGLU, biases
    everywhere, softmax over the top-2 router logits; the harmony template for the chat check."""
    cfg = dict(
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attention_bias=True,
        swiglu_limit=7.0,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             original_max_position_embeddings=64, truncate=False),
    )
    template = gpt_oss_template()
    for name, q in [("gpt-oss-mxfp4", True), ("gpt-oss-bf16-experts", False)]:
        make(name, "gpt_oss", cfg, tie=False, bos_post=False, add_bos=False, f64=True, post=gpt_oss_post,
             mxfp4=q, dtype=torch.float32 if q else torch.bfloat16, specials=HARMONY_SPECIALS,
             chat=q, template=template, chat_messages=GPT_OSS_CHAT,
             chat_kwargs={"today": "2026-01-15", "reasoning_effort": "high"}, noise=True)


def is_layer_matrix(name):
    """The projection matrices inside the decoder layers (attention, dense MLP, experts, shared
    experts); not routers (mlp.gate.weight), norms, biases, embeddings or lm_head."""
    return re.fullmatch(r"model\.layers\.\d+\..*_proj(_with_mqa)?\.weight", name) is not None


QWEN3_FP8 = dict(
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=96,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)

DEEPSEEK_V2 = dict(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=24,
    intermediate_size=96,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,  # > topk_group: with group score = its max, top_k <= topk_group never binds
    topk_method="group_limited_greedy",
    scoring_func="softmax",
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.5,
    norm_topk_prob=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)

DEEPSEEK_V3_YARN = dict(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rope_interleave=True,
    max_position_embeddings=256,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=64,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
)


if __name__ == "__main__":
    main()
