//! Prediction heads (the flexible heads of AdapterHub's `BertAdapterModel`): the classification
//! head and its softmax cross-entropy loss, forward and backward, written against `Backend` only.
//!
//! `add_classification_head(name, num_labels, layers, activation_function, use_pooler)` builds
//! `heads.<name>` as an `nn.Sequential` where every layer starts with a Dropout (identity in eval
//! mode; `forward_with` applies them in training mode), so the module indices, and therefore the
//! state-dict keys, are:
//! - `layers = 2`: `0` Dropout, `1` Linear(H, H), `2` activation, `3` Dropout, `4` Linear(H, C);
//! - `layers = 1`: `0` Dropout, `1` Linear(H, C).
//!
//! The input is the first token of `last_hidden_state`, or the pooler output when `use_pooler`.
//! Heads live outside the base model: their keys carry no `bert.` prefix.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::backend::{Activation, Backend, DropoutSpec};
pub use crate::config::{HeadConfig, HeadConfigFile};
use crate::error::{Error, Result};
use crate::model::backward::{dests, dropout_spec, DropoutSite, GradSink};
use crate::tensor::{DType, Tensor};

/// Training-mode dropout of one head application: the masks of its Dropout modules are a pure
/// function of `(seed, module, branch, element)`, so the backward recomputes them.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadDropout {
    pub seed: u64,
    /// The device buffer holding `seed`, read by the kernels when given (see `DropoutSpec`).
    pub seed_buffer: Option<crate::backend::SeedBuffer>,
    /// The probability (`ClassificationHead::dropout_prob` resolves the config's default).
    pub p: f32,
    /// The Parallel branch the head reads (0 outside Parallel): the masks' block id, as in the
    /// encoder, so branch i draws the same masks whichever other branches exist.
    pub branch: u64,
    /// The element offset of this batch's first row in the global batch (`DropoutSpec::offset`:
    /// row · H for a data-parallel shard); 0 otherwise.
    pub offset: u64,
}

impl HeadDropout {
    /// The dropout of Sequential module `module` (0, or 3 before the output Linear of a 2-layer
    /// head); None for p = 0 (an exact identity) or another index.
    pub fn spec(&self, module: usize) -> Option<DropoutSpec> {
        let site = match module {
            0 => DropoutSite::HeadInput,
            3 => DropoutSite::HeadHidden,
            _ => return None,
        };
        let mut spec = dropout_spec(Some(self.seed), self.p, 0, site, vec![self.branch])?;
        spec.seed_buffer = self.seed_buffer.clone();
        spec.offset = self.offset;
        Some(spec)
    }
}

/// What `ClassificationHead::forward` keeps for the backward.
#[derive(Clone, Debug)]
pub struct HeadTape {
    /// The head input `x`, `[B, H]`.
    input: Tensor,
    /// What the first Linear read: `x` after Dropout 0 (`x` itself in eval mode).
    x0: Tensor,
    /// `W1·x0 + b1` and its activation after Dropout 3 (what the output Linear read), for `layers = 2`.
    hidden: Option<(Tensor, Tensor)>,
    /// T of `last_hidden_state`, or None when the input was the pooler output.
    seq_len: Option<usize>,
    /// The dropouts of modules 0 and 3 that the forward applied; the backward applies the same.
    dropout: [Option<DropoutSpec>; 2],
}

impl HeadTape {
    /// The head input `[B, H]` (first token or pooler output).
    pub fn input(&self) -> &Tensor {
        &self.input
    }
}

/// A classification head `heads.<name>`: `forward` is eval mode (its dropouts are the identity),
/// `forward_with` given a `HeadDropout` is training mode.
#[derive(Clone, Debug)]
pub struct ClassificationHead {
    name: String,
    config: HeadConfig,
    activation: Activation,
    hidden_size: usize,
    params: BTreeMap<String, Tensor>,
}

/// `x` through `spec`'s dropout, or `x` itself (eval mode, p = 0).
fn maybe_dropout(backend: &dyn Backend, x: Tensor, spec: &Option<DropoutSpec>) -> Result<Tensor> {
    match spec {
        Some(s) => backend.dropout(&x, s),
        None => Ok(x),
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('.') {
        return Err(Error::Input(format!("head name `{name}` must be non-empty and contain no `.` (it is a state-dict key segment)")));
    }
    Ok(())
}

impl ClassificationHead {
    /// The parameter keys and shapes of head `name`, in module order.
    pub fn expected_shapes(name: &str, config: &HeadConfig, hidden_size: usize) -> Vec<(String, Vec<usize>)> {
        let (hid, out) = config.linear_indices();
        let mut v = Vec::new();
        if let Some(i) = hid {
            v.push((format!("heads.{name}.{i}.weight"), vec![hidden_size, hidden_size]));
            v.push((format!("heads.{name}.{i}.bias"), vec![hidden_size]));
        }
        v.push((format!("heads.{name}.{out}.weight"), vec![config.num_labels, hidden_size]));
        if config.bias {
            v.push((format!("heads.{name}.{out}.bias"), vec![config.num_labels]));
        }
        v
    }

    /// A fresh head as the library initialises it (`_init_weights` of BERT): weights
    /// N(0, 0.02), biases 0, drawn in module order from a generator seeded with `seed`.
    pub fn new(backend: &dyn Backend, name: &str, config: HeadConfig, hidden_size: usize, seed: u64) -> Result<Self> {
        check_name(name)?;
        config.validate()?;
        if hidden_size == 0 {
            return Err(Error::Input(format!("head `{name}`: hidden_size must be > 0")));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::internal(format!("initializer: {e}")))?;
        let mut params = BTreeMap::new();
        for (key, shape) in Self::expected_shapes(name, &config, hidden_size) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if key.ends_with(".weight") { (0..n).map(|_| normal.sample(&mut rng)).collect() } else { vec![0.0; n] };
            params.insert(key, backend.upload(data, &shape)?);
        }
        let activation = config.activation().unwrap_or(Activation::Tanh);
        Ok(ClassificationHead { name: name.to_string(), config, activation, hidden_size, params })
    }

    /// A head from existing tensors keyed `heads.<name>.<i>.weight/bias` (e.g. loaded from the
    /// library's head file). Every expected key must be present with its shape, and no other.
    pub fn from_params(name: &str, config: HeadConfig, mut params: BTreeMap<String, Tensor>) -> Result<Self> {
        check_name(name)?;
        config.validate()?;
        let (_, out) = config.linear_indices();
        let out_w = format!("heads.{name}.{out}.weight");
        let hidden_size = match params.get(&out_w) {
            Some(w) if w.rank() == 2 => w.shape()[1],
            Some(w) => return Err(Error::shape("ClassificationHead::from_params", format!("`{out_w}` has shape {:?}, expected [{}, H]", w.shape(), config.num_labels))),
            None => return Err(Error::Input(format!("head `{name}`: tensor `{out_w}` is missing"))),
        };
        let mut kept = BTreeMap::new();
        for (key, shape) in Self::expected_shapes(name, &config, hidden_size) {
            let t = params.remove(&key).ok_or_else(|| Error::Input(format!("head `{name}`: tensor `{key}` is missing")))?;
            if t.shape() != shape.as_slice() {
                return Err(Error::shape("ClassificationHead::from_params", format!("`{key}` has shape {:?}, expected {shape:?}", t.shape())));
            }
            kept.insert(key, t);
        }
        if !params.is_empty() {
            let extra: Vec<&str> = params.keys().map(String::as_str).collect();
            return Err(Error::Input(format!("head `{name}`: unexpected tensors {extra:?}")));
        }
        let activation = config.activation().unwrap_or(Activation::Tanh);
        Ok(ClassificationHead { name: name.to_string(), config, activation, hidden_size, params: kept })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn config(&self) -> &HeadConfig {
        &self.config
    }
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    pub fn num_labels(&self) -> usize {
        self.config.num_labels
    }

    /// The probability of the head's Dropout modules in training mode: `dropout_prob`, or the
    /// model's `hidden_dropout_prob` when it is None (as the library builds them).
    pub fn dropout_prob(&self, hidden_dropout_prob: f32) -> f32 {
        self.config.dropout_prob.map_or(hidden_dropout_prob, |p| p as f32)
    }

    /// The parameters by state-dict key.
    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    /// The parameters by key, for the optimizer. Replacing a tensor with one of another shape
    /// makes the next forward fail with a shape error.
    pub fn params_mut(&mut self) -> &mut BTreeMap<String, Tensor> {
        &mut self.params
    }

    fn param(&self, idx: usize, what: &str) -> Result<&Tensor> {
        let key = format!("heads.{}.{idx}.{what}", self.name);
        self.params.get(&key).ok_or_else(|| Error::Input(format!("head `{}`: parameter `{key}` was removed", self.name)))
    }

    fn out_bias(&self, out: usize) -> Result<Option<&Tensor>> {
        if self.config.bias {
            self.param(out, "bias").map(Some)
        } else {
            Ok(None)
        }
    }

    /// Eval-mode logits `[B, C]` and the tape for `backward`. `pooler_output` (`[B, H]`) is
    /// required when the head was configured with `use_pooler`, and ignored otherwise.
    pub fn forward(&self, backend: &dyn Backend, last_hidden_state: &Tensor, pooler_output: Option<&Tensor>) -> Result<(Tensor, HeadTape)> {
        self.forward_with(backend, last_hidden_state, pooler_output, None)
    }

    /// `forward`, in training mode when `dropout` is given: Dropout 0 on the input and, with two
    /// layers, Dropout 3 on the activation, with the masks of `dropout` (kept in the tape, so
    /// `backward` passes the gradient through the same masks).
    pub fn forward_with(&self, backend: &dyn Backend, last_hidden_state: &Tensor, pooler_output: Option<&Tensor>, dropout: Option<&HeadDropout>) -> Result<(Tensor, HeadTape)> {
        const OP: &str = "ClassificationHead::forward";
        let h = self.hidden_size;
        let (input, seq_len) = if self.config.use_pooler {
            let p = pooler_output.ok_or_else(|| Error::Input(format!("head `{}` reads the pooler output (use_pooler) but none was given", self.name)))?;
            if p.rank() != 2 || p.shape()[1] != h {
                return Err(Error::shape(OP, format!("pooler output has shape {:?}, expected [B, {h}]", p.shape())));
            }
            (p.clone(), None)
        } else {
            let s = last_hidden_state.shape();
            if s.len() != 3 || s[2] != h || s[1] == 0 {
                return Err(Error::shape(OP, format!("last_hidden_state has shape {s:?}, expected [B, T >= 1, {h}]")));
            }
            (backend.first_token(last_hidden_state)?, Some(s[1]))
        };
        // The head runs in f32 whatever the encoder's activations: a bf16 input (the CUDA
        // backend's bf16 eval forward) is widened exactly, so the head's weights stay f32 and its
        // logits are f32 (the head is [B, H]·[H, C], tiny next to the encoder).
        let input = if input.dtype() == DType::F32 { input } else { backend.cast(&input, DType::F32)? };
        let (hid, out) = self.config.linear_indices();
        let spec = |module: usize| dropout.and_then(|d| d.spec(module));
        let dropout = [spec(0), hid.and_then(|_| spec(3))];
        let x0 = maybe_dropout(backend, input.clone(), &dropout[0])?;
        let hidden = match hid {
            Some(i) => {
                let pre = backend.linear(&x0, self.param(i, "weight")?, Some(self.param(i, "bias")?))?;
                let act = maybe_dropout(backend, backend.activation(&pre, self.activation)?, &dropout[1])?;
                Some((pre, act))
            }
            None => None,
        };
        let x_out = hidden.as_ref().map_or(&x0, |(_, a)| a);
        let logits = backend.linear(x_out, self.param(out, "weight")?, self.out_bias(out)?)?;
        Ok((logits, HeadTape { input, x0, hidden, seq_len, dropout }))
    }

    /// Parameter gradients (keyed like `params()`) and the gradient of the head's input:
    /// `∂L/∂last_hidden_state` `[B, T, H]`, zero except at position 0, or `∂L/∂pooler_output`
    /// `[B, H]` when `use_pooler`.
    pub fn backward(&self, backend: &dyn Backend, tape: &HeadTape, dlogits: &Tensor) -> Result<(BTreeMap<String, Tensor>, Tensor)> {
        self.backward_with(backend, tape, dlogits, true)
    }

    /// `backward`, computing parameter gradients only when `want_params` (a frozen head runs
    /// input-gradient products only, and returns an empty map).
    pub fn backward_with(&self, backend: &dyn Backend, tape: &HeadTape, dlogits: &Tensor, want_params: bool) -> Result<(BTreeMap<String, Tensor>, Tensor)> {
        let mut grads = BTreeMap::new();
        let batch = tape.input.shape()[0];
        let shape = match tape.seq_len {
            Some(t) => vec![batch, t, tape.input.last_dim()],
            None => tape.input.shape().to_vec(),
        };
        let d_input = backend.zeros(&shape, crate::tensor::DType::F32)?;
        self.backward_into(backend, tape, dlogits, want_params.then_some(&mut grads as &mut dyn GradSink), &d_input)?;
        Ok((grads, d_input))
    }

    /// The backward with the parameter gradients written into `sink`'s destinations (None: a
    /// frozen head, input-gradient products only) and the input gradient added to `d_input`
    /// (`[B, T, H]`, position 0 only, or `[B, H]` when `use_pooler`): heads of several branches
    /// sum into one buffer.
    pub(crate) fn backward_into(&self, backend: &dyn Backend, tape: &HeadTape, dlogits: &Tensor, mut sink: Option<&mut dyn GradSink>, d_input: &Tensor) -> Result<()> {
        let batch = tape.input.shape()[0];
        let c = self.config.num_labels;
        if dlogits.shape() != [batch, c] {
            return Err(Error::shape("ClassificationHead::backward", format!("dlogits has shape {:?}, expected [{batch}, {c}]", dlogits.shape())));
        }
        let (hid, out) = self.config.linear_indices();
        if hid.is_some() != tape.hidden.is_some() || tape.input.last_dim() != self.hidden_size || tape.seq_len.is_none() != self.config.use_pooler {
            return Err(Error::Input(format!("head `{}`: the tape comes from a head of another configuration", self.name)));
        }
        let x_out = tape.hidden.as_ref().map_or(&tape.x0, |(_, a)| a);
        if let Some(sink) = sink.as_mut() {
            self.linear_params_into(backend, &mut **sink, out, self.config.bias, dlogits, x_out)?;
        }
        let mut dx = backend.linear_backward_input(dlogits, self.param(out, "weight")?)?;
        // Dropout is linear and its own adjoint: the same mask and scale.
        if let (Some(i), Some((pre, _))) = (hid, tape.hidden.as_ref()) {
            dx = maybe_dropout(backend, dx, &tape.dropout[1])?;
            let dpre = backend.activation_backward(&dx, pre, self.activation)?;
            if let Some(sink) = sink.as_mut() {
                self.linear_params_into(backend, &mut **sink, i, true, &dpre, &tape.x0)?;
            }
            dx = backend.linear_backward_input(&dpre, self.param(i, "weight")?)?;
        }
        dx = maybe_dropout(backend, dx, &tape.dropout[0])?;
        // The head ran in f32 on a widened input: its input gradient goes back to the encoder in
        // the encoder's dtype (bf16 training rounds it once here, as autocast's cast backward does).
        if dx.dtype() != d_input.dtype() {
            dx = backend.cast(&dx, d_input.dtype())?;
        }
        match tape.seq_len {
            Some(_) => backend.first_token_backward_into(&dx, d_input, true),
            None => backend.add_into(d_input, &dx),
        }
    }

    /// The gradients of Linear `idx` (input `x`, output gradient `dy`) into the sink.
    fn linear_params_into(&self, backend: &dyn Backend, sink: &mut dyn GradSink, idx: usize, bias: bool, dy: &Tensor, x: &Tensor) -> Result<()> {
        let name = &self.name;
        let w = self.param(idx, "weight")?;
        if bias {
            let b = self.param(idx, "bias")?;
            let ([dw, db], accumulate) = dests(sink, backend, [(format!("heads.{name}.{idx}.weight"), w.shape()), (format!("heads.{name}.{idx}.bias"), b.shape())])?;
            backend.linear_backward_params_into(dy, x, &dw, Some(&db), accumulate)
        } else {
            let ([dw], accumulate) = dests(sink, backend, [(format!("heads.{name}.{idx}.weight"), w.shape())])?;
            backend.linear_backward_params_into(dy, x, &dw, None, accumulate)
        }
    }
}

/// `torch.nn.CrossEntropyLoss()` (mean over the batch) of `logits` `[B, C]` for class indices
/// `labels`, and its gradient `dlogits = (softmax − onehot)/B`, on the device
/// (`Backend::loss`, f64 per row with the max subtracted: stable for any finite logits); only
/// the loss is read back. Non-finite logits are an error: they mean
/// training has diverged, and torch would return NaN.
pub fn cross_entropy(backend: &dyn Backend, logits: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
    const OP: &str = "cross_entropy";
    if logits.rank() != 2 {
        return Err(Error::shape(OP, format!("logits have shape {:?}, expected [B, C]", logits.shape())));
    }
    let (b, c) = (logits.shape()[0], logits.shape()[1]);
    if labels.len() != b {
        return Err(Error::shape(OP, format!("{} labels for {b} rows of logits", labels.len())));
    }
    if b == 0 || c == 0 {
        return Err(Error::Input(format!("cross_entropy of an empty batch (logits {:?})", logits.shape())));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= c) {
        return Err(Error::Input(format!("label {l} (batch row {i}) is out of range for {c} classes")));
    }
    // The backend's fused softmax cross-entropy (`train::loss`), then one read of the loss.
    let labels_t = backend.upload_u32(labels.iter().map(|&l| l as u32).collect(), &[b])?;
    let op = crate::train::loss::LossOp { objective: crate::train::loss::Objective::CrossEntropy, trained: logits, other: None, labels: &labels_t };
    let (dlogits, loss) = op.run(backend)?;
    let value = backend.to_host(&loss)?[0];
    if !value.is_finite() {
        // Name the first non-finite logit (the error path reads the logits back).
        let host = backend.to_host(logits)?;
        if let Some(k) = host.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("cross_entropy: logit [{}, {}] is {}", k / c, k % c, host[k])));
        }
        return Err(Error::NonFinite { at: "the cross-entropy".into() });
    }
    Ok((value, dlogits))
}
