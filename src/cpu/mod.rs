//! The CPU backend: a plain reference (`reference`, the spec) and a fast path (`fast`, what the
//! model uses), behind one `Backend` implementation that checks shapes once for both.

mod adapter;
pub mod fast;
pub mod reference;

use crate::backend::{Activation, AdapterLocation, Backend, NiceParams, TokenBatch};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which CPU implementation runs the ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Plain loops with f64 accumulation: slow, obvious, the oracle for everything else.
    Reference,
    /// gemm + rayon: what the model runs on by default.
    Fast,
}

#[derive(Clone, Debug)]
pub struct CpuBackend {
    mode: CpuMode,
}

impl CpuBackend {
    pub fn new(mode: CpuMode) -> Self {
        CpuBackend { mode }
    }
    pub fn fast() -> Self {
        Self::new(CpuMode::Fast)
    }
    pub fn reference() -> Self {
        Self::new(CpuMode::Reference)
    }
    pub fn mode(&self) -> CpuMode {
        self.mode
    }
}

fn expect_shape(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

fn expect_rank(op: &'static str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected rank {rank}", t.shape())));
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn name(&self) -> String {
        match self.mode {
            CpuMode::Reference => "cpu (reference)".into(),
            CpuMode::Fast => format!("cpu (fast, {} threads)", rayon::current_num_threads()),
        }
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data, shape)
    }

    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.cpu_data()?.to_vec())
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        expect_rank(OP, "weight", w, 2)?;
        let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
        if x.rank() == 0 || x.last_dim() != d_in {
            return Err(Error::shape(OP, format!("input {:?} does not end in {d_in} (weight {:?})", x.shape(), w.shape())));
        }
        if let Some(b) = b {
            expect_shape(OP, "bias", b, &[d_out])?;
        }
        let rows = x.rows();
        let (xs, ws, bs) = (x.cpu_data()?, w.cpu_data()?, b.map(|b| b.cpu_data()).transpose()?);
        let y = match self.mode {
            CpuMode::Reference => reference::linear(xs, ws, bs, rows, d_in, d_out),
            CpuMode::Fast => fast::linear(xs, ws, bs, rows, d_in, d_out),
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank checked above") = d_out;
        Tensor::from_vec(y, &shape)
    }

    fn embedding(&self, tokens: &TokenBatch, word: &Tensor, position: &Tensor, token_type: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        expect_rank(OP, "word embeddings", word, 2)?;
        let hidden = word.shape()[1];
        let n = tokens.batch * tokens.seq_len;
        if tokens.input_ids.len() != n || tokens.token_type_ids.len() != n {
            return Err(Error::shape(OP, format!("{n} tokens expected, got ids {} and types {}", tokens.input_ids.len(), tokens.token_type_ids.len())));
        }
        expect_rank(OP, "position embeddings", position, 2)?;
        expect_rank(OP, "token type embeddings", token_type, 2)?;
        if position.shape()[1] != hidden || token_type.shape()[1] != hidden {
            return Err(Error::shape(OP, "embedding tables of different widths".to_string()));
        }
        if tokens.seq_len > position.shape()[0] {
            return Err(Error::shape(OP, format!("sequence length {} > {} positions", tokens.seq_len, position.shape()[0])));
        }
        let (vocab, types) = (word.shape()[0], token_type.shape()[0]);
        if let Some(id) = tokens.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {id} >= vocabulary size {vocab}")));
        }
        if let Some(t) = tokens.token_type_ids.iter().find(|&&t| t as usize >= types) {
            return Err(Error::Input(format!("token type id {t} >= type vocabulary size {types}")));
        }
        let (w, p, t) = (word.cpu_data()?, position.cpu_data()?, token_type.cpu_data()?);
        let y = match self.mode {
            CpuMode::Reference => reference::embedding(tokens, w, p, t, hidden),
            CpuMode::Fast => fast::embedding(tokens, w, p, t, hidden),
        };
        Tensor::from_vec(y, &[tokens.batch, tokens.seq_len, hidden])
    }

    fn residual_layernorm(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "residual_layernorm";
        let cols = x.last_dim();
        if let Some(r) = residual {
            expect_shape(OP, "residual", r, x.shape())?;
        }
        expect_shape(OP, "gamma", gamma, &[cols])?;
        expect_shape(OP, "beta", beta, &[cols])?;
        let (xs, rs) = (x.cpu_data()?, residual.map(|r| r.cpu_data()).transpose()?);
        let (g, b) = (gamma.cpu_data()?, beta.cpu_data()?);
        let y = match self.mode {
            CpuMode::Reference => reference::residual_layernorm(xs, rs, g, b, cols, eps).y,
            CpuMode::Fast => fast::residual_layernorm(xs, rs, g, b, cols, eps),
        };
        Tensor::from_vec(y, x.shape())
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize) -> Result<Tensor> {
        const OP: &str = "attention";
        expect_rank(OP, "query", q, 3)?;
        expect_shape(OP, "key", k, q.shape())?;
        expect_shape(OP, "value", v, q.shape())?;
        let (batch, seq, hidden) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        expect_shape(OP, "mask", mask_bias, &[batch, seq])?;
        if heads == 0 || hidden % heads != 0 {
            return Err(Error::shape(OP, format!("hidden {hidden} is not divisible by {heads} heads")));
        }
        let (qs, ks, vs, ms) = (q.cpu_data()?, k.cpu_data()?, v.cpu_data()?, mask_bias.cpu_data()?);
        let y = match self.mode {
            CpuMode::Reference => reference::attention(qs, ks, vs, ms, batch, seq, hidden, heads),
            CpuMode::Fast => fast::attention(qs, ks, vs, ms, batch, seq, hidden, heads),
        };
        Tensor::from_vec(y, q.shape())
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let xs = x.cpu_data()?;
        let y = match self.mode {
            CpuMode::Reference => reference::activation(xs, act),
            CpuMode::Fast => fast::activation(xs, act),
        };
        Tensor::from_vec(y, x.shape())
    }

    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor> {
        adapter::adapter_location(adapter::Prims(self.mode), loc)
    }

    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor> {
        adapter::nice(adapter::Prims(self.mode), x, params, inverse)
    }

    fn first_token(&self, x: &Tensor) -> Result<Tensor> {
        expect_rank("first_token", "input", x, 3)?;
        let (b, t, h) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if t == 0 {
            return Err(Error::shape("first_token", "empty sequence".to_string()));
        }
        Tensor::from_vec(reference::first_token(x.cpu_data()?, b, t, h), &[b, h])
    }
}
