//! Broken GGUF files fail at open with a one-line error naming the file and the problem.

use std::path::Path;

use airllm::ModelInfo;

/// A minimal GGUF writer for making valid and broken files.
struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
}

/// A valid one-layer llama file, with `tweak` applied to the parts before they are joined.
struct Parts {
    magic: &'static [u8; 4],
    version: u32,
    skip_key: Option<&'static str>,
    tensor_type: u32,
    data_offset_extra: u64,
    bad_string_len: bool,
}

impl Default for Parts {
    fn default() -> Self {
        Parts {
            magic: b"GGUF",
            version: 3,
            skip_key: None,
            tensor_type: 0,
            data_offset_extra: 0,
            bad_string_len: false,
        }
    }
}

fn build(p: &Parts) -> Vec<u8> {
    let (h, ff, vocab) = (8usize, 16usize, 4usize);
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for (n, s) in [
        ("attn_norm", vec![h]),
        ("attn_q", vec![h, h]),
        ("attn_k", vec![h, h]),
        ("attn_v", vec![h, h]),
        ("attn_output", vec![h, h]),
        ("ffn_norm", vec![h]),
        ("ffn_gate", vec![ff, h]),
        ("ffn_up", vec![ff, h]),
        ("ffn_down", vec![h, ff]),
    ] {
        tensors.push((format!("blk.0.{n}.weight"), s));
    }
    let kvs: Vec<(&str, u32)> = vec![
        ("llama.embedding_length", h as u32),
        ("llama.block_count", 1),
        ("llama.feed_forward_length", ff as u32),
        ("llama.attention.head_count", 2),
    ];
    let mut w = W(Vec::new());
    w.0.extend(p.magic);
    w.u32(p.version).u64(tensors.len() as u64);
    let n_kv = 2 + kvs.iter().filter(|(k, _)| Some(*k) != p.skip_key).count() as u64;
    w.u64(n_kv);
    if p.bad_string_len {
        w.str("general.architecture").u32(8).u64(1 << 40);
        w.0.extend([0u8; 4096]);
        return w.0;
    }
    w.kv_str("general.architecture", "llama");
    // The epsilon is an f32.
    w.str("llama.attention.layer_norm_rms_epsilon")
        .u32(6)
        .0
        .extend(1e-5f32.to_le_bytes());
    for (k, v) in &kvs {
        if Some(*k) != p.skip_key {
            w.kv_u32(k, *v);
        }
    }
    let mut off = 0u64;
    let mut sizes = vec![];
    for (i, (name, shape)) in tensors.iter().enumerate() {
        w.str(name).u32(shape.len() as u32);
        for d in shape.iter().rev() {
            w.u64(*d as u64);
        }
        let ty = if i == 2 { p.tensor_type } else { 0 };
        w.u32(ty);
        let extra = if i + 1 == tensors.len() {
            p.data_offset_extra
        } else {
            0
        };
        w.u64(off + extra);
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        sizes.push(bytes);
        off += bytes.next_multiple_of(32);
    }
    while !w.0.len().is_multiple_of(32) {
        w.0.push(0);
    }
    for b in sizes {
        w.0.extend(std::iter::repeat_n(0u8, b.next_multiple_of(32) as usize));
    }
    w.0
}

fn open(bytes: &[u8], dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    match ModelInfo::open(&p) {
        Ok(_) => "OK".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_valid_file_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(&build(&Parts::default()), tmp.path(), "ok.gguf");
    // It has no tokenizer, which only the tokenizer needs; the model itself opens.
    assert_eq!(e, "OK");
}

#[test]
fn broken_files_give_one_line_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let valid = build(&Parts::default());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "wrong magic",
            build(&Parts {
                magic: b"GGML",
                ..Default::default()
            }),
            "not a GGUF file",
        ),
        (
            "unsupported version",
            build(&Parts {
                version: 7,
                ..Default::default()
            }),
            "unsupported GGUF version 7",
        ),
        (
            "truncated header",
            valid[..valid.len() / 4].to_vec(),
            "runs past the end of the file",
        ),
        (
            "truncated data",
            valid[..valid.len() - 40].to_vec(),
            "runs past the end of the file",
        ),
        (
            "data past the end",
            build(&Parts {
                data_offset_extra: 1 << 20,
                ..Default::default()
            }),
            "blk.0.ffn_down.weight",
        ),
        (
            "unknown quantization",
            build(&Parts {
                tensor_type: 99,
                ..Default::default()
            }),
            "unknown or unsupported quantization type 99",
        ),
        (
            "missing metadata",
            build(&Parts {
                skip_key: Some("llama.block_count"),
                ..Default::default()
            }),
            "llama.block_count",
        ),
        (
            "string longer than the file",
            build(&Parts {
                bad_string_len: true,
                ..Default::default()
            }),
            "runs past the end of the file",
        ),
        ("empty file", vec![], "not a GGUF file"),
    ];
    for (what, bytes, needle) in cases {
        let name = format!("{}.gguf", what.replace(' ', "-"));
        let e = open(&bytes, tmp.path(), &name);
        assert!(e.contains(&name), "{what}: `{e}` does not name the file");
        assert!(e.contains(needle), "{what}: `{e}` does not say `{needle}`");
        assert!(!e.contains('\n'), "{what}: multi-line error");
    }
}

/// A copy of the llama.cpp-converted fixture `file` with the u32 metadata `key` set to `n`.
fn with_u32(file: &str, key: &str, n: u32) -> Vec<u8> {
    let path = crate::common::fixture(&format!("gguf/tiny/{file}"));
    let mut bytes = std::fs::read(path).unwrap();
    let k = key.as_bytes();
    let at = bytes
        .windows(k.len())
        .position(|w| w == k)
        .unwrap_or_else(|| panic!("{file} has {key}"))
        + k.len();
    // The value's type (u32 = 4), then the value.
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "{key} is a u32");
    bytes[at + 4..at + 8].copy_from_slice(&n.to_le_bytes());
    bytes
}

fn mixtral_with_expert_count(n: u32) -> Vec<u8> {
    with_u32("mixtral-f32.gguf", "llama.expert_count", n)
}

#[test]
fn deepseek_routing_and_latent_ranks_that_do_not_fit_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let f = "deepseek2-v3-f32.gguf";
    assert_eq!(
        open(
            &with_u32(f, "deepseek2.expert_group_count", 4),
            tmp.path(),
            "ok.gguf"
        ),
        "OK"
    );
    for (key, n, name, needle) in [
        (
            "deepseek2.expert_group_count",
            3,
            "groups.gguf",
            "3 groups do not divide the 8 experts",
        ),
        (
            "deepseek2.expert_group_used_count",
            5,
            "used.gguf",
            "5 must be between 1 and the 4 groups",
        ),
        (
            "deepseek2.attention.kv_lora_rank",
            30,
            "rank.gguf",
            "blk.0.attn_kv_a_mqa.weight",
        ),
    ] {
        let e = open(&with_u32(f, key, n), tmp.path(), name);
        assert!(e.contains(name), "{key}: {e}");
        assert!(e.contains(needle), "{key}: `{e}` does not say `{needle}`");
        if !key.ends_with("kv_lora_rank") {
            assert!(e.contains(key), "{key}: {e}");
        }
        assert!(!e.contains('\n'), "{key}: {e}");
    }
}

#[test]
fn an_expert_count_that_disagrees_with_the_tensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        open(&mixtral_with_expert_count(4), tmp.path(), "four.gguf"),
        "OK"
    );
    let e = open(&mixtral_with_expert_count(3), tmp.path(), "three.gguf");
    assert!(e.contains("three.gguf"), "{e}");
    assert!(e.contains("blk.0.ffn_gate_inp.weight"), "{e}");
    assert!(e.contains("(3 experts)") && e.contains("[4, 64]"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}
