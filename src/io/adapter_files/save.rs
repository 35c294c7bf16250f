//! The safetensors bytes an adapter save writes, from named host tensors (`crate::model::persist`
//! takes them off the model).

use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};

/// A tensor to write: state-dict key, shape, data.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// `tensors` (an adapter's, in the library's state-dict order) with `ln_before`'s LayerNorm
/// written under both of its library names, `adapter_norm_before.*` and `adapter_down.0.*`, as
/// two separate tensors: the library shares one storage between them and so cannot write
/// safetensors at all ("Some tensors share memory"); both names keep the file loadable by it with
/// `use_safetensors=True`, where each key fills its own parameter.
pub fn with_ln_before_aliases(tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    let mut out: Vec<NamedTensor> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let then_aliases = t.0.ends_with(".adapter_norm_before.bias");
        out.push(t);
        // The library's order: adapter_norm_before.{weight,bias}, then adapter_down.0.{weight,bias}.
        if then_aliases {
            let pair: Vec<_> = out[out.len() - 2..]
                .iter()
                .map(|(k, s, d)| (k.replace(".adapter_norm_before.", ".adapter_down.0."), s.clone(), d.clone()))
                .collect();
            out.extend(pair);
        }
    }
    out
}

/// F32 tensors as safetensors bytes with `{"format": "pt"}` metadata, as `save_file` in
/// `safetensors.torch` writes them.
pub fn safetensors_bytes(tensors: &[NamedTensor], origin: &Path) -> Result<Vec<u8>> {
    let raw: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), bytes) in tensors.iter().zip(&raw) {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| Error::tensor(origin, name, format!("cannot serialize: {e}")))?;
        views.push((name.clone(), view));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::malformed(origin, format!("cannot serialize: {e}")))
}
