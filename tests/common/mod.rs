//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bert_adapters::io::TensorFile;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `max|out − ref|` and the project's bound `rel·(1 + max|ref|)`.
pub fn assert_close(name: &str, out: &[f32], reference: &[f32], rel: f64) {
    assert_eq!(out.len(), reference.len(), "{name}: length {} vs reference {}", out.len(), reference.len());
    let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&a, &b)) in out.iter().zip(reference).enumerate() {
        let d = (a as f64 - b as f64).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    let bound = rel * (1.0 + max_ref);
    assert!(
        worst <= bound,
        "{name}: max|out-ref| = {worst:.3e} at {at} (out {}, ref {}) exceeds {bound:.3e} (max|ref| {max_ref:.3})",
        out[at],
        reference[at]
    );
}

pub fn read_f32(file: &TensorFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    file.read_f32(name).unwrap_or_else(|e| panic!("fixture {}: {e}", file.path().display()))
}

pub fn random_vec(rng: &mut impl rand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// Write a safetensors file with arbitrary dtypes: `(name, dtype, shape, little-endian bytes)`.
pub fn write_raw_safetensors(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every tensor of a safetensors file as `(name, dtype, shape, bytes)`, in file order.
pub fn read_raw_safetensors(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A copy of a fixture model folder in a temp dir, for tests that rewrite its files.
pub fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "inputs.safetensors"] {
        std::fs::copy(fixtures().join(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}
