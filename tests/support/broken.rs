//! Makes broken copies of fixture models for the bad-input tests. Shared by the library's and
//! the CLI's tests with `#[path]`, so each bad input is checked both as an error value and as the
//! binary's exit status and message.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf")
}

pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = fixtures().join(name);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites the JSON header of a safetensors file, keeping its data.
pub fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// The name of some tensor in a safetensors header.
pub fn a_tensor(header: &serde_json::Value) -> String {
    let mut names: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    names.sort();
    names[0].clone()
}

/// Each way of breaking a model folder the engine must report, with a text the error must contain.
pub fn cases() -> Vec<(&'static str, tempfile::TempDir, PathBuf, Vec<String>)> {
    let mut out = Vec::new();

    let (t, d) = copy_fixture("qwen2-bias-mha-sharded");
    let shard = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("model-0000") && n.ends_with(".safetensors"))
        .max()
        .unwrap();
    std::fs::remove_file(d.join(&shard)).unwrap();
    out.push(("missing shard", t, d, vec![shard, "missing shard".into()]));

    let (t, d) = copy_fixture("llama-gqa2-llama3rope");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    out.push((
        "truncated file",
        t,
        d,
        vec!["model.safetensors".into(), "truncated".into()],
    ));

    let (t, d) = copy_fixture("llama-gqa2-llama3rope");
    let f = d.join("model.safetensors");
    let mut name = String::new();
    edit_header(&f, |h| {
        name = a_tensor(h);
        let o = h[&name]["data_offsets"].as_array().unwrap();
        let (b, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        h[&name]["data_offsets"] = serde_json::json!([b + (1 << 30), e + (1 << 30)]);
    });
    out.push((
        "offsets past the end",
        t,
        d,
        vec![
            "model.safetensors".into(),
            name.clone(),
            "but the file has".into(),
        ],
    ));

    let (t, d) = copy_fixture("llama-gqa2-llama3rope");
    edit_json(&d.join("config.json"), |c| {
        c["intermediate_size"] = serde_json::json!(100)
    });
    out.push((
        "shape disagrees with config",
        t,
        d,
        vec![
            "mlp.gate_proj.weight".into(),
            "disagrees with the config".into(),
        ],
    ));

    let (t, d) = copy_fixture("mistral-sliding-window");
    edit_json(&d.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    out.push((
        "config missing a field",
        t,
        d,
        vec!["config.json".into(), "num_hidden_layers".into()],
    ));

    let (t, d) = copy_fixture("llama-gqa2-llama3rope");
    let f = d.join("model.safetensors");
    let mut name = String::new();
    edit_header(&f, |h| {
        name = a_tensor(h);
        h[&name]["dtype"] = serde_json::json!("F8_E8M0");
    });
    out.push((
        "unknown dtype",
        t,
        d,
        vec![
            "model.safetensors".into(),
            name,
            "unsupported dtype `F8_E8M0`".into(),
        ],
    ));

    let (t, d) = copy_fixture("qwen3-qknorm-headdim");
    edit_json(&d.join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["GPTBigFooForCausalLM"])
    });
    out.push((
        "unknown architecture",
        t,
        d,
        vec!["GPTBigFooForCausalLM".into(), "LlamaForCausalLM".into()],
    ));

    // Mixtures of experts: the expert count disagrees with the tensors either way, an expert
    // is missing, a router has the wrong shape, top-k exceeds the experts.
    let (t, d) = copy_fixture("mixtral-moe");
    edit_json(&d.join("config.json"), |c| {
        c["num_local_experts"] = serde_json::json!(3)
    });
    out.push((
        "fewer experts in the config than the checkpoint",
        t,
        d,
        vec![
            "block_sparse_moe.gate.weight".into(),
            "[4, 64]".into(),
            "(3 experts)".into(),
        ],
    ));

    let (t, d) = copy_fixture("qwen3moe-dense-layer");
    edit_json(&d.join("config.json"), |c| {
        c["num_local_experts"] = serde_json::json!(9)
    });
    out.push((
        "more experts in the config than the checkpoint",
        t,
        d,
        vec!["mlp.gate.weight".into(), "(9 experts)".into()],
    ));

    let (t, d) = copy_fixture("qwen3moe-dense-layer");
    let extra = "model.layers.0.mlp.experts.8.up_proj.weight";
    edit_header(&d.join("model.safetensors"), |h| {
        h[extra] = h["model.layers.0.mlp.experts.7.up_proj.weight"].clone();
    });
    out.push((
        "an expert more than the config names",
        t,
        d,
        vec![extra.into(), "more than the 8 the config names".into()],
    ));

    let (t, d) = copy_fixture("mixtral-moe");
    let missing = "model.layers.2.block_sparse_moe.experts.1.w3.weight";
    edit_header(&d.join("model.safetensors"), |h| {
        let v = h.as_object_mut().unwrap().remove(missing).unwrap();
        h["unrelated.extra.weight"] = v;
    });
    out.push((
        "missing expert",
        t,
        d,
        vec![missing.into(), "missing".into()],
    ));

    let (t, d) = copy_fixture("qwen2moe-shared-expert");
    let router = "model.layers.1.mlp.gate.weight";
    edit_header(&d.join("model.safetensors"), |h| {
        h[router]["shape"] = serde_json::json!([3, 128]);
    });
    out.push((
        "router of the wrong shape",
        t,
        d,
        vec![router.into(), "[3, 128]".into(), "[6, 64]".into()],
    ));

    let (t, d) = copy_fixture("qwen2moe-shared-expert");
    edit_json(&d.join("config.json"), |c| {
        c["num_experts_per_tok"] = serde_json::json!(7)
    });
    out.push((
        "top-k beyond the experts",
        t,
        d,
        vec!["config.json".into(), "num_experts_per_tok".into()],
    ));

    // FP8 block scales transposed: the same bytes, the wrong shape.
    let (t, d) = copy_fixture("qwen3-fp8-block");
    let scale = "model.layers.0.self_attn.q_proj.weight_scale_inv";
    edit_header(&d.join("model.safetensors"), |h| {
        let s = h[scale]["shape"].as_array().unwrap().clone();
        h[scale]["shape"] = serde_json::json!([s[1], s[0]]);
    });
    out.push((
        "FP8 scales of the wrong shape",
        t,
        d,
        vec![
            "model.safetensors".into(),
            scale.into(),
            "weight_block_size".into(),
        ],
    ));

    // DeepSeek-V3 without its correction bias: the tensor is named.
    let (t, d) = copy_fixture("deepseek-v3-mla-noaux-yarn");
    edit_header(&d.join("model.safetensors"), |h| {
        let o = h.as_object_mut().unwrap();
        let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
        let v = o.remove(bias).unwrap();
        o.insert(format!("{bias}_renamed"), v);
    });
    out.push((
        "missing correction bias",
        t,
        d,
        vec!["model.layers.1.mlp.gate.e_score_correction_bias".into()],
    ));

    // A latent rank that disagrees with the tensors.
    let (t, d) = copy_fixture("deepseek-v2-mla-grouped");
    edit_json(&d.join("config.json"), |c| {
        c["kv_lora_rank"] = serde_json::json!(16)
    });
    out.push((
        "latent rank against the tensors",
        t,
        d,
        vec!["kv_a_proj_with_mqa".into()],
    ));

    // GPT-OSS: MXFP4 scales that do not match their blocks, blocks of the wrong layout, sinks
    // of the wrong length, and a SwiGLU limit missing from the config.
    let gu = "model.layers.0.mlp.experts.gate_up_proj";
    let (t, d) = copy_fixture("gpt-oss-mxfp4");
    edit_header(&d.join("model.safetensors"), |h| {
        let s = &mut h[format!("{gu}_scales")];
        let [e, r, g] = [0, 1, 2].map(|i| s["shape"][i].as_u64().unwrap());
        s["shape"] = serde_json::json!([e, r / 2, g * 2]);
    });
    out.push((
        "MXFP4 scales against their blocks",
        t,
        d,
        vec![format!("{gu}_scales"), "need U8 scales".into()],
    ));
    let (t, d) = copy_fixture("gpt-oss-mxfp4");
    edit_header(&d.join("model.safetensors"), |h| {
        let b = &mut h[format!("{gu}_blocks")];
        let [e, r, g, k] = [0, 1, 2, 3].map(|i| b["shape"][i].as_u64().unwrap());
        b["shape"] = serde_json::json!([e, r, g * k]);
    });
    out.push((
        "MXFP4 blocks of the wrong layout",
        t,
        d,
        vec![format!("{gu}_blocks"), "[experts, rows, blocks, 16]".into()],
    ));
    let (t, d) = copy_fixture("gpt-oss-mxfp4");
    edit_header(&d.join("model.safetensors"), |h| {
        h["model.layers.1.self_attn.sinks"]["shape"] = serde_json::json!([2, 2]);
    });
    out.push((
        "sinks of the wrong shape",
        t,
        d,
        vec!["model.layers.1.self_attn.sinks".into(), "[4]".into()],
    ));
    let (t, d) = copy_fixture("gpt-oss-mxfp4");
    edit_json(&d.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("swiglu_limit");
    });
    out.push((
        "SwiGLU limit missing",
        t,
        d,
        vec!["config.json".into(), "swiglu_limit".into()],
    ));

    // Gated DeltaNet hybrids.
    let (t, d) = copy_fixture("qwen3next-hybrid");
    edit_json(&d.join("config.json"), |c| {
        c["layer_types"][1] = serde_json::json!("mamba");
    });
    out.push((
        "an unknown layer type",
        t,
        d,
        vec!["config.json".into(), "layer_types".into(), "mamba".into()],
    ));
    let (t, d) = copy_fixture("qwen3_5moe-hybrid");
    edit_json(&d.join("config.json"), |c| {
        c["linear_key_head_dim"] = serde_json::json!(8);
    });
    out.push((
        "a state dimension the tensors disagree with",
        t,
        d,
        vec![
            "model.layers.0.linear_attn.in_proj_qkv.weight".into(),
            "disagrees with the config".into(),
        ],
    ));
    for (what, name) in [
        ("A_log missing", "model.layers.2.linear_attn.A_log"),
        ("dt_bias missing", "model.layers.0.linear_attn.dt_bias"),
    ] {
        let (t, d) = copy_fixture("qwen3next-hybrid");
        edit_header(&d.join("model.safetensors"), |h| {
            h.as_object_mut().unwrap().remove(name);
        });
        out.push((
            what,
            t,
            d,
            vec![name.into(), "missing from the checkpoint".into()],
        ));
    }
    let (t, d) = copy_fixture("qwen3next-hybrid");
    edit_json(&d.join("config.json"), |c| {
        c["linear_num_value_heads"] = serde_json::json!(3);
    });
    out.push((
        "value heads that do not divide into key heads",
        t,
        d,
        vec!["config.json".into(), "linear_num_value_heads".into()],
    ));

    out
}
