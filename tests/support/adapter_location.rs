//! Adapter-location test cases shared by tests/cuda_adapter.rs (forward) and
//! tests/cuda_adapter_backward.rs: branch specs, random host weights (CPU tensors), their device
//! copies, the pfeiffer/houlsby location steps, the CPU reference's view of a case and its label.
//! Included with `#[path]`, not a crate.

use bert_adapters::backend::{AdapterLocation, BottleneckParams, DropoutSpec, LayerNormParams, LocationSteps, ScalingParam};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cuda::adapter::{BranchDropout, BranchWeights, DeviceLayerNorm, DeviceScaling, DropoutSeed, LocationShape};
use bert_adapters::cuda::gpu::{DeviceBuffer, Gpu};
use bert_adapters::{Activation, Tensor};
use rand::rngs::StdRng;
use rand::Rng;


#[derive(Clone, Copy, Debug)]
pub enum Scale {
    Fixed(f32),
    Learned,
    Channel,
}

#[derive(Clone, Copy, Debug)]
pub struct BranchSpec {
    pub m: usize,
    pub act: Activation,
    pub ln_before: bool,
    pub ln_after: bool,
    pub scale: Scale,
    pub gate: bool,
    pub residual_first: bool,
}

impl BranchSpec {
    /// pfeiffer / houlsby cores: relu or swish, fixed scaling 1, nothing else.
    pub fn plain(m: usize, act: Activation) -> Self {
        BranchSpec { m, act, ln_before: false, ln_after: false, scale: Scale::Fixed(1.0), gate: false, residual_first: false }
    }
    /// Every option that has parameters.
    pub fn full(m: usize, act: Activation, scale: Scale, residual_first: bool) -> Self {
        BranchSpec { m, act, ln_before: true, ln_after: true, scale, gate: true, residual_first }
    }
    /// The branch in a test label: bottleneck, activation, scaling and the options it has.
    pub fn label(&self) -> String {
        let flag = |on: bool, name: &'static str| if on { name } else { "" };
        format!("m{} {:?} {:?}{}{}{}{}", self.m, self.act, self.scale, flag(self.ln_before, " lnB"), flag(self.ln_after, " lnA"), flag(self.gate, " gate"), flag(self.residual_first, " resFirst"))
    }
}

/// The BERT LayerNorm's eps (the adapters' own LayerNorms use 1e-5, see `HostBranch::random`).
pub const BERT_EPS: f32 = 1e-12;

/// A case's label in failure messages: its shape, `flags` (more " name=value" pairs), the steps
/// and one entry per branch.
pub fn location_label(shape: LocationShape, flags: &str, steps: LocationSteps, branches: &[String]) -> String {
    format!("B={} T={} H={} N={} replicate={}{flags} {steps:?} [{}]", shape.batch, shape.seq_len, shape.hidden, shape.branches, shape.replicate, branches.join("; "))
}

/// h or r on the host as the CPU reference takes it: `[rows, T, H]`, rows from the length.
pub fn host_rows(data: &[f32], seq_len: usize, hidden: usize) -> Tensor {
    tensor(data.to_vec(), &[data.len() / (seq_len * hidden), seq_len, hidden])
}

/// The CPU reference's location (the specification the CUDA kernels are tested against): h, r
/// `[rows, T, H]`, the BERT LayerNorm's γ, β `[H]` at `BERT_EPS`, the branches' parameters, and
/// the case's T and replication.
pub fn host_location<'a>(h: &'a Tensor, r: &'a Tensor, gamma: &'a Tensor, beta: &'a Tensor, steps: LocationSteps, params: &'a [BottleneckParams<'a>], shape: LocationShape) -> AdapterLocation<'a> {
    AdapterLocation { h, r, layer_norm: LayerNormParams { gamma, beta, eps: BERT_EPS }, steps, branches: params, replicate: shape.replicate, seq_len: shape.seq_len }
}

pub const PFEIFFER: LocationSteps = LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: true, original_ln_after: true };
pub const HOULSBY: LocationSteps = LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: false, original_ln_after: true };

pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape).unwrap()
}

pub fn data(t: &Tensor) -> Vec<f32> {
    t.f32_data().unwrap().to_vec()
}

/// One branch's weights as CPU tensors.
#[derive(Clone)]
pub struct HostBranch {
    pub spec: BranchSpec,
    pub down_w: Tensor,
    pub down_b: Tensor,
    pub up_w: Tensor,
    pub up_b: Tensor,
    pub ln_before: Option<(Tensor, Tensor)>,
    pub ln_after: Option<(Tensor, Tensor)>,
    pub scaling: Option<Tensor>,
    pub gate: Option<(Tensor, Tensor)>,
    /// The adapter's own dropout (None: eval, or p = 0 as the model passes it).
    pub dropout: Option<DropoutSpec>,
}

/// The adapter dropout of a Parallel branch as the model builds it: p, the step's seed, the
/// location's stream and the branch's id as its one block.
pub fn adapter_dropout(p: f32, seed: u64, stream: u64, id: u64) -> DropoutSpec {
    DropoutSpec { p, seed, stream, blocks: vec![id], seed_buffer: None, offset: 0 }
}

/// The seed of the branches' dropout for a launch: the first one's (the model's branches share it).
pub fn dropout_seed<'a>(branches: &[HostBranch]) -> Option<DropoutSeed<'a>> {
    branches.iter().find_map(|b| b.dropout.as_ref()).map(|d| DropoutSeed { buffer: None, seed: d.seed })
}

impl HostBranch {
    pub fn random(rng: &mut StdRng, h: usize, spec: BranchSpec) -> Self {
        Self::random_scaled(rng, h, spec, 1.0)
    }

    /// As `random`, with the gate weights `gate_scale` times larger (the backward's tests want
    /// the gate's logit to move enough for its gradient to matter).
    pub fn random_scaled(rng: &mut StdRng, h: usize, spec: BranchSpec, gate_scale: f32) -> Self {
        let m = spec.m;
        // Blown up: about 3x what keeps variances at 1 (bert init is N(0, 0.02)).
        let (wd, wu) = (3.0 / (h as f32).sqrt(), 3.0 / (m as f32).sqrt());
        let mut ln = |on: bool| on.then(|| (tensor(uniform(rng, h, 0.5, 1.5), &[h]), tensor(uniform(rng, h, -0.5, 0.5), &[h])));
        let (ln_before, ln_after) = (ln(spec.ln_before), ln(spec.ln_after));
        HostBranch {
            spec,
            down_w: tensor(uniform(rng, m * h, -wd, wd), &[m, h]),
            down_b: tensor(uniform(rng, m, -0.5, 0.5), &[m]),
            up_w: tensor(uniform(rng, h * m, -wu, wu), &[h, m]),
            up_b: tensor(uniform(rng, h, -0.5, 0.5), &[h]),
            ln_before,
            ln_after,
            scaling: match spec.scale {
                Scale::Fixed(_) => None,
                Scale::Learned => Some(tensor(vec![rng.random_range(1.5..2.5)], &[1])),
                Scale::Channel => Some(tensor(uniform(rng, h, -2.5, 2.5), &[h])),
            },
            gate: spec.gate.then(|| (tensor(uniform(rng, h, -gate_scale * wd, gate_scale * wd), &[1, h]), tensor(uniform(rng, 1, -0.5, 0.5), &[1]))),
            dropout: None,
        }
    }

    /// The same branch with every tensor uploaded to `be` (f32), for tests through `Backend`.
    pub fn on(&self, be: &dyn bert_adapters::Backend) -> HostBranch {
        let up = |t: &Tensor| be.upload(data(t), t.shape()).unwrap();
        let pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, b)| (up(a), up(b)));
        HostBranch {
            spec: self.spec,
            down_w: up(&self.down_w),
            down_b: up(&self.down_b),
            up_w: up(&self.up_w),
            up_b: up(&self.up_b),
            ln_before: pair(&self.ln_before),
            ln_after: pair(&self.ln_after),
            scaling: self.scaling.as_ref().map(up),
            gate: pair(&self.gate),
            dropout: self.dropout.clone(),
        }
    }

    pub fn with_dropout(mut self, dropout: Option<DropoutSpec>) -> Self {
        self.dropout = dropout;
        self
    }

    pub fn params(&self) -> BottleneckParams<'_> {
        pub fn ln(p: &Option<(Tensor, Tensor)>) -> Option<LayerNormParams<'_>> {
            p.as_ref().map(|(g, b)| LayerNormParams { gamma: g, beta: b, eps: 1e-5 })
        }
        BottleneckParams {
            down_w: &self.down_w,
            down_b: &self.down_b,
            up_w: &self.up_w,
            up_b: &self.up_b,
            activation: self.spec.act,
            ln_before: ln(&self.ln_before),
            ln_after: ln(&self.ln_after),
            scaling: match (self.spec.scale, &self.scaling) {
                (Scale::Fixed(s), _) => ScalingParam::Fixed(s),
                (Scale::Learned, Some(t)) => ScalingParam::Learned(t),
                (Scale::Channel, Some(t)) => ScalingParam::Channel(t),
                _ => unreachable!("random() makes a scaling tensor for learned and channel"),
            },
            gate: self.gate.as_ref().map(|(w, b)| (w, b)),
            adapter_residual_before_ln: self.spec.residual_first,
            dropout: self.dropout.clone(),
        }
    }
}

/// The same branch on the device.
pub struct DeviceBranch {
    pub spec: BranchSpec,
    pub down_w: DeviceBuffer<f32>,
    pub down_b: DeviceBuffer<f32>,
    pub up_w: DeviceBuffer<f32>,
    pub up_b: DeviceBuffer<f32>,
    pub ln_before: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    pub ln_after: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    pub scaling: Option<DeviceBuffer<f32>>,
    pub gate: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    pub dropout: Option<BranchDropout>,
}

impl DeviceBranch {
    pub fn upload(gpu: &Gpu, b: &HostBranch) -> Self {
        let up = |t: &Tensor| gpu.upload(&data(t)).unwrap();
        let pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, b)| (up(a), up(b)));
        DeviceBranch {
            spec: b.spec,
            down_w: up(&b.down_w),
            down_b: up(&b.down_b),
            up_w: up(&b.up_w),
            up_b: up(&b.up_b),
            ln_before: pair(&b.ln_before),
            ln_after: pair(&b.ln_after),
            scaling: b.scaling.as_ref().map(up),
            gate: pair(&b.gate),
            dropout: b.dropout.as_ref().map(|d| BranchDropout::of(d).unwrap()),
        }
    }

    pub fn weights(&self) -> BranchWeights<'_> {
        pub fn ln(p: &Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>) -> Option<DeviceLayerNorm<'_>> {
            p.as_ref().map(|(g, b)| DeviceLayerNorm { gamma: g.view(), beta: b.view(), eps: 1e-5 })
        }
        BranchWeights {
            bottleneck: self.spec.m,
            down_w: self.down_w.view(),
            down_b: self.down_b.view(),
            up_w: self.up_w.view(),
            up_b: self.up_b.view(),
            activation: self.spec.act,
            ln_before: ln(&self.ln_before),
            ln_after: ln(&self.ln_after),
            scaling: match (self.spec.scale, &self.scaling) {
                (Scale::Fixed(s), _) => DeviceScaling::Fixed(s),
                (Scale::Learned, Some(t)) => DeviceScaling::Learned(t.view()),
                (Scale::Channel, Some(t)) => DeviceScaling::Channel(t.view()),
                _ => unreachable!("upload() copies the scaling tensor"),
            },
            gate: self.gate.as_ref().map(|(w, b)| (w.view(), b.view())),
            adapter_residual_before_ln: self.spec.residual_first,
            dropout: self.dropout,
        }
    }
}
