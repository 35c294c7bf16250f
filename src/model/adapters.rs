//! Bottleneck adapters as the model holds them: parameters by their library state-dict key,
//! initialisation, and the active setup (one adapter, or Parallel).

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::backend::{Backend, BottleneckParams, LayerNormParams, NiceParams, ScalingParam};
pub use crate::config::validate_adapter_name;
use crate::config::{AdapterConfig, BertConfig, InitWeights, Location, Scaling};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The widest bottleneck accepted, as a multiple of the hidden size.
pub const MAX_BOTTLENECK_RATIO: usize = 64;

/// Adapter-internal LayerNorms use PyTorch's default eps, not BERT's (spec gotcha 4).
pub const ADAPTER_LN_EPS: f32 = 1e-5;

/// Which adapters run, in the library's composition terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterSetup {
    /// One adapter (the library's `Stack(name)`).
    Single(String),
    /// `Parallel(a, b, ...)`: the batch is replicated once per child at the first adapter
    /// location; branch i owns rows `[i·B, (i+1)·B)`.
    Parallel(Vec<String>),
}

impl AdapterSetup {
    pub fn names(&self) -> &[String] {
        match self {
            AdapterSetup::Single(n) => std::slice::from_ref(n),
            AdapterSetup::Parallel(v) => v,
        }
    }
    pub fn is_parallel(&self) -> bool {
        matches!(self, AdapterSetup::Parallel(_))
    }
}

impl std::fmt::Display for AdapterSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterSetup::Single(n) => write!(f, "{n}"),
            AdapterSetup::Parallel(v) => write!(f, "Parallel({})", v.join(", ")),
        }
    }
}

/// How a freshly added parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal(f64),
    TruncatedNormal { std: f64, cut: f64 },
    /// Kaiming-uniform with a = √5 (PyTorch's Linear default): U(±1/√fan_in).
    KaimingUniform { fan_in: usize },
    Constant(f32),
}

/// One parameter of an adapter: its library key, shape and initialiser.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub key: String,
    pub shape: Vec<usize>,
    init: Init,
}

/// The key prefix of adapter `name` at one location, e.g. `encoder.layer.0.output.adapters.a.`.
pub fn location_prefix(name: &str, layer: usize, location: Location) -> String {
    format!("{}adapters.{name}.", location.module_prefix(layer))
}

pub fn nice_prefix(name: &str) -> String {
    format!("invertible_adapters.{name}.")
}

/// Every parameter adapter `name` with `config` has on a BERT of `bert`, in the library's
/// state-dict order (layer by layer, attention location before output, then the NICE block).
pub fn param_specs(name: &str, config: &AdapterConfig, bert: &BertConfig) -> Result<Vec<ParamSpec>> {
    let h = bert.hidden_size;
    let mut specs = Vec::new();
    let mut push = |key: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { key, shape, init });
    let linear_init = |fan_in: usize, up: bool| match config.init_weights {
        InitWeights::Bert => Init::Normal(0.02),
        InitWeights::Houlsby => Init::TruncatedNormal { std: 1e-2, cut: 2e-2 },
        InitWeights::MamAdapter if up => Init::Constant(0.0),
        InitWeights::MamAdapter => Init::KaimingUniform { fan_in },
    };
    let zero = Init::Constant(0.0);
    for layer in 0..bert.num_hidden_layers {
        for location in Location::BOTH {
            if !config.has_location(layer, location) {
                continue;
            }
            let p = location_prefix(name, layer, location);
            let m = config.bottleneck_size(layer, h)?;
            // A tiny reduction factor would ask for an absurd allocation; the library has no use
            // for a bottleneck wider than this either.
            if m > MAX_BOTTLENECK_RATIO * h {
                return Err(Error::Input(format!(
                    "adapter `{name}`: reduction_factor gives a bottleneck of {m} at layer {layer}, more than {MAX_BOTTLENECK_RATIO}× the hidden size {h}"
                )));
            }
            let down = if config.ln_before {
                push(format!("{p}adapter_norm_before.weight"), vec![h], Init::Constant(1.0));
                push(format!("{p}adapter_norm_before.bias"), vec![h], zero);
                "adapter_down.1"
            } else {
                "adapter_down.0"
            };
            push(format!("{p}{down}.weight"), vec![m, h], linear_init(h, false));
            push(format!("{p}{down}.bias"), vec![m], zero);
            push(format!("{p}adapter_up.weight"), vec![h, m], linear_init(m, true));
            push(format!("{p}adapter_up.bias"), vec![h], zero);
            if config.ln_after {
                push(format!("{p}adapter_norm_after.weight"), vec![h], Init::Constant(1.0));
                push(format!("{p}adapter_norm_after.bias"), vec![h], zero);
            }
            match config.scaling {
                Scaling::Fixed(_) => {}
                Scaling::Learned => push(format!("{p}scaling"), vec![1], Init::Constant(1.0)),
                Scaling::Channel => push(format!("{p}scaling"), vec![h], Init::Constant(1.0)),
            }
            if config.use_gating {
                push(format!("{p}gate.weight"), vec![1, h], Init::Normal(0.02));
                push(format!("{p}gate.bias"), vec![1], zero);
            }
        }
    }
    if config.inv_adapter {
        let rf = config.inv_adapter_reduction_factor.unwrap_or(2.0);
        let (s1, s2) = (h / 2, h - h / 2);
        let k = |n: usize| (n as f64 / rf).floor() as usize;
        if k(s1.min(s2)) == 0 || k(s1.max(s2)) > MAX_BOTTLENECK_RATIO * h {
            return Err(Error::Input(format!(
                "adapter `{name}`: inv_adapter_reduction_factor {rf} gives NICE sub-networks of {} and {} units",
                k(s2),
                k(s1)
            )));
        }
        let p = nice_prefix(name);
        for (sub, d_in, d_out) in [("F", s2, s1), ("G", s1, s2)] {
            push(format!("{p}{sub}.0.weight"), vec![k(d_in), d_in], Init::Normal(0.02));
            push(format!("{p}{sub}.0.bias"), vec![k(d_in)], zero);
            push(format!("{p}{sub}.2.weight"), vec![d_out, k(d_in)], Init::Normal(0.02));
            push(format!("{p}{sub}.2.bias"), vec![d_out], zero);
        }
    }
    Ok(specs)
}

fn draw(init: Init, n: usize, rng: &mut StdRng) -> Vec<f32> {
    match init {
        Init::Constant(c) => vec![c; n],
        Init::Normal(std) => {
            let normal = Normal::new(0.0, std).expect("std is a positive constant");
            (0..n).map(|_| normal.sample(rng) as f32).collect()
        }
        Init::TruncatedNormal { std, cut } => {
            let normal = Normal::new(0.0, std).expect("std is a positive constant");
            (0..n)
                .map(|_| loop {
                    let v: f64 = normal.sample(rng);
                    if v.abs() <= cut {
                        break v as f32;
                    }
                })
                .collect()
        }
        Init::KaimingUniform { fan_in } => {
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
        }
    }
}

/// A bottleneck adapter (and its NICE block, if configured) with its parameters.
pub struct Adapter {
    name: String,
    config: AdapterConfig,
    /// By library key without a `bert.` prefix; `ln_before`'s LayerNorm lives under
    /// `adapter_norm_before.*` only (the library's `adapter_down.0.*` alias is not stored twice).
    params: BTreeMap<String, Tensor>,
    /// Per layer, [attention output, FFN output]: the location's tensors resolved from `params`
    /// once (not by formatting keys and searching the map on every call). Clones share storage,
    /// so in-place updates (AdamW) are seen; `params_mut` drops the cache.
    descriptors: std::sync::OnceLock<Vec<[Option<LocationTensors>; 2]>>,
}

/// One location's tensors (see `Adapter::descriptors`).
struct LocationTensors {
    down: (Tensor, Tensor),
    up: (Tensor, Tensor),
    ln_before: Option<(Tensor, Tensor)>,
    ln_after: Option<(Tensor, Tensor)>,
    scaling: Option<Tensor>,
    gate: Option<(Tensor, Tensor)>,
}

impl Adapter {
    /// A new adapter with the config's initialisation, drawn from `seed`.
    pub fn init(name: &str, config: AdapterConfig, bert: &BertConfig, seed: u64, backend: &dyn Backend) -> Result<Self> {
        validate_adapter_name(name)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = BTreeMap::new();
        let mut last_location = String::new();
        for spec in param_specs(name, &config, bert)? {
            // init_weights_seed re-seeds before each module, so every location is identical.
            if let Some(s) = config.init_weights_seed {
                let module = spec.key.rsplit_once(&format!("adapters.{name}.")).map(|(p, _)| p.to_string()).unwrap_or_default();
                if module != last_location {
                    rng = StdRng::seed_from_u64(s);
                    last_location = module;
                }
            }
            let data = draw(spec.init, spec.shape.iter().product(), &mut rng);
            params.insert(spec.key, backend.upload(data, &spec.shape)?);
        }
        Ok(Adapter { name: name.to_string(), config, params, descriptors: std::sync::OnceLock::new() })
    }

    /// An adapter from loaded tensors; every parameter the config implies must be there with its
    /// shape, and nothing else.
    pub fn from_params(name: &str, config: AdapterConfig, bert: &BertConfig, mut params: BTreeMap<String, Tensor>) -> Result<Self> {
        validate_adapter_name(name)?;
        let specs = param_specs(name, &config, bert)?;
        let mut out = BTreeMap::new();
        for spec in &specs {
            let t = params.remove(&spec.key).ok_or_else(|| Error::Input(format!("adapter `{name}`: tensor `{}` is missing", spec.key)))?;
            if t.shape() != spec.shape.as_slice() {
                return Err(Error::Input(format!(
                    "adapter `{name}`: tensor `{}` has shape {:?}, but the config needs {:?}",
                    spec.key,
                    t.shape(),
                    spec.shape
                )));
            }
            out.insert(spec.key.clone(), t);
        }
        if let Some(extra) = params.keys().next() {
            return Err(Error::Input(format!("adapter `{name}`: tensor `{extra}` is unexpected for its config")));
        }
        Ok(Adapter { name: name.to_string(), config, params: out, descriptors: std::sync::OnceLock::new() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }
    /// Parameters by library key (no `bert.` prefix).
    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    /// Mutable parameters, for optimizers. Shapes must not change.
    pub fn params_mut(&mut self) -> &mut BTreeMap<String, Tensor> {
        self.descriptors = std::sync::OnceLock::new(); // entries may be replaced
        &mut self.params
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.params.get(key).ok_or_else(|| Error::Input(format!("adapter `{}` has no tensor `{key}`", self.name)))
    }

    /// The tensors of one location, looked up in the map.
    fn resolve(&self, layer: usize, location: Location) -> Result<LocationTensors> {
        let p = location_prefix(&self.name, layer, location);
        let k = |s: &str| self.get(&format!("{p}{s}")).cloned();
        let pair = |which: &str| -> Result<(Tensor, Tensor)> { Ok((k(&format!("{which}.weight"))?, k(&format!("{which}.bias"))?)) };
        let down = if self.config.ln_before { "adapter_down.1" } else { "adapter_down.0" };
        Ok(LocationTensors {
            down: pair(down)?,
            up: pair("adapter_up")?,
            ln_before: if self.config.ln_before { Some(pair("adapter_norm_before")?) } else { None },
            ln_after: if self.config.ln_after { Some(pair("adapter_norm_after")?) } else { None },
            scaling: match self.config.scaling {
                Scaling::Fixed(_) => None,
                Scaling::Learned | Scaling::Channel => Some(k("scaling")?),
            },
            gate: if self.config.use_gating { Some(pair("gate")?) } else { None },
        })
    }

    /// Every location's tensors, resolved once (layers counted from the keys present).
    fn descriptors(&self) -> Result<&[[Option<LocationTensors>; 2]]> {
        if let Some(d) = self.descriptors.get() {
            return Ok(d);
        }
        let layers = self
            .params
            .keys()
            .filter_map(|k| k.strip_prefix("encoder.layer.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |l| l + 1);
        let mut all = Vec::with_capacity(layers);
        for layer in 0..layers {
            let mut both: [Option<LocationTensors>; 2] = [None, None];
            for (i, location) in Location::BOTH.into_iter().enumerate() {
                if self.config.has_location(layer, location) {
                    both[i] = Some(self.resolve(layer, location)?);
                }
            }
            all.push(both);
        }
        Ok(self.descriptors.get_or_init(|| all))
    }

    /// The weights at one location, if the adapter has a module there.
    pub fn bottleneck(&self, layer: usize, location: Location) -> Result<Option<BottleneckParams<'_>>> {
        if !self.config.has_location(layer, location) {
            return Ok(None);
        }
        let slot = Location::BOTH.iter().position(|&l| l == location).unwrap_or(0);
        let t = match self.descriptors()?.get(layer).and_then(|d| d[slot].as_ref()) {
            Some(t) => t,
            // A location beyond the stored layers: name the first missing tensor.
            None => return Err(self.resolve(layer, location).err().unwrap_or_else(|| Error::internal(format!("adapter `{}`: location {layer} not resolved", self.name)))),
        };
        fn ln(p: &Option<(Tensor, Tensor)>) -> Option<LayerNormParams<'_>> {
            p.as_ref().map(|(g, b)| LayerNormParams { gamma: g, beta: b, eps: ADAPTER_LN_EPS })
        }
        Ok(Some(BottleneckParams {
            down_w: &t.down.0,
            down_b: &t.down.1,
            up_w: &t.up.0,
            up_b: &t.up.1,
            activation: self.config.non_linearity,
            ln_before: ln(&t.ln_before),
            ln_after: ln(&t.ln_after),
            scaling: match (self.config.scaling, &t.scaling) {
                (Scaling::Learned, Some(s)) => ScalingParam::Learned(s),
                (Scaling::Channel, Some(s)) => ScalingParam::Channel(s),
                (Scaling::Fixed(s), _) => ScalingParam::Fixed(s as f32),
                _ => return Err(Error::internal(format!("adapter `{}`: scaling tensor not resolved", self.name))),
            },
            gate: t.gate.as_ref().map(|(w, b)| (w, b)),
            adapter_residual_before_ln: self.config.adapter_residual_before_ln,
            dropout: None,
        }))
    }

    /// The NICE block, if the adapter has one.
    pub fn nice(&self) -> Result<Option<NiceParams<'_>>> {
        if !self.config.inv_adapter {
            return Ok(None);
        }
        let p = nice_prefix(&self.name);
        let pair = |s: &str| -> Result<(&Tensor, &Tensor)> { Ok((self.get(&format!("{p}{s}.weight"))?, self.get(&format!("{p}{s}.bias"))?)) };
        Ok(Some(NiceParams { f0: pair("F.0")?, f2: pair("F.2")?, g0: pair("G.0")?, g2: pair("G.2")?, activation: self.config.non_linearity }))
    }
}
