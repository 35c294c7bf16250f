//! The tensors and safetensors bytes an adapter save writes (used by `crate::model::persist`).

use std::path::Path;

use safetensors::Dtype;

use crate::backend::Backend;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::model::adapters::{param_specs, Adapter};
use crate::model::heads::ClassificationHead;

/// A tensor to write: state-dict key, shape, data.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of `adapter` as the library saves them, in its state-dict order, without the
/// `bert.` prefix (a `BertModel` has none). With `ln_before` the LayerNorm is written under both
/// of its library names, `adapter_norm_before.*` and `adapter_down.0.*`, as two separate tensors:
/// the library shares one storage between them and so cannot write safetensors at all
/// ("Some tensors share memory"); both names keep the file loadable by it with
/// `use_safetensors=True`, where each key fills its own parameter.
pub fn adapter_tensors(adapter: &Adapter, bert: &BertConfig, backend: &dyn Backend) -> Result<Vec<NamedTensor>> {
    let name = adapter.name();
    let specs = param_specs(name, adapter.config(), bert)?;
    let mut out: Vec<NamedTensor> = Vec::with_capacity(specs.len());
    for spec in specs {
        let t = adapter.params().get(&spec.key).ok_or_else(|| Error::Input(format!("adapter `{name}` has no tensor `{}`", spec.key)))?;
        let data = backend.to_host(t)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("adapter `{name}`: tensor `{}` holds {} at element {i}; refusing to save it", spec.key, data[i])));
        }
        let then_aliases = spec.key.ends_with(".adapter_norm_before.bias");
        out.push((spec.key, t.shape().to_vec(), data));
        // The library's order: adapter_norm_before.{weight,bias}, then adapter_down.0.{weight,bias}.
        if then_aliases {
            let pair: Vec<_> = out[out.len() - 2..]
                .iter()
                .map(|(k, s, d)| (k.replace(".adapter_norm_before.", ".adapter_down.0."), s.clone(), d.clone()))
                .collect();
            out.extend(pair);
        }
    }
    Ok(out)
}

/// A head's tensors by state-dict key (`heads.<name>.<i>.weight/bias`).
pub fn head_tensors(head: &ClassificationHead, backend: &dyn Backend) -> Result<Vec<NamedTensor>> {
    head.params().iter().map(|(k, t)| Ok((k.clone(), t.shape().to_vec(), backend.to_host(t)?))).collect()
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
