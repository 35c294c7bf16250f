//! Launcher for `kernels/embedding.cu`: BERT's word + position + token-type gather, sum and
//! LayerNorm in one kernel (the spec: `cpu::reference::embedding` then
//! `cpu::reference::residual_layernorm`). RoBERTa's positions ([`Positions::FromIds`]) are
//! counted from the ids by the kernel itself: no position-id buffer, one `padding_idx` argument
//! (negative for BERT's `0..seq_len`).
//!
//! Launch configuration: the LayerNorm's ([`LayerNormPlan::auto`], see [`super::layernorm`]):
//! one warp per row and 8 rows per block up to 1024 columns, one block per row beyond, the row's
//! sum cached in shared memory when it fits.
//!
//! # Token ids are checked on the device
//!
//! The ids live in device memory, so the launcher cannot look at them. The kernel refuses any
//! `input_id >= vocab` or `token_type_id >= type_vocab` (the tables' row counts): it never reads
//! outside a table, writes NaN over that token's row (and its mean/rstd), and records the first
//! such token, in (batch, position) order, in an error flag: one `u64` in device memory, zero
//! before the launch ([`new_error_flag`], or [`Gpu::memset_zero`] to reuse one). **The caller
//! checks it** with [`check_flag`] before trusting the output (one 8-byte read, which waits for
//! the stream). The flag accumulates: after several launches it names the bad token with the
//! smallest (batch, position) among them, until it is zeroed.
//! The model's ids are already checked on the host before they are written, so this is the
//! device's own line of defence, not the primary check.
//!
//! The tables and the LayerNorm's γ, β are all f32 or all bf16 (a frozen base loaded in bf16):
//! [`EmbeddingInputs`] is generic over their [`BaseScalar`] `T`, and [`EmbeddingOutputs`] over
//! the [`ActivationScalar`] `A` of `y`. The launcher picks the kernel by `(A::DTYPE, T::DTYPE)`:
//! (f32, f32) `embedding_layernorm_forward_f32`, (f32, bf16) `_bf16`, (bf16, bf16) `_bf16io`
//! (bf16 activations from a bf16 base); bf16 `y` from f32 tables is [`Error::Unsupported`],
//! before anything is launched. One templated body, loads widened exactly, sums and statistics in
//! f32 whatever the types: `mean` and `rstd` are f32, and a bf16 `y` is the f32 kernel's `y`
//! rounded once (to nearest even). f16 is the same: (f32, f16) `_f16`, (f16, f16) `_f16io`; bf16
//! and f16 never pair.
//!
//! Every length is checked before anything is enqueued ([`Error::Shape`] naming the operand and
//! the numbers), and an output sharing a byte with another operand is [`Error::Input`]; a
//! rejected call writes nothing.

use super::elementwise::check_disjoint_bytes;
use super::gpu::{ActivationScalar, BaseScalar, DeviceBuffer, DeviceScalar, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::layernorm::LayerNormPlan;
use super::registry::embedding::{EMBEDDING_LAYERNORM_FORWARD_BF16, EMBEDDING_LAYERNORM_FORWARD_BF16IO, EMBEDDING_LAYERNORM_FORWARD_F16, EMBEDDING_LAYERNORM_FORWARD_F16IO, EMBEDDING_LAYERNORM_FORWARD_F32};
use super::registry::KernelName;
use crate::config::Positions;
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "cuda::embedding_layernorm_forward";

/// The largest batch and sequence length whose positions fit the error flag's key (see the
/// kernel header): `b < 65535`, `t < 32768`.
pub const MAX_BATCH: usize = 65535;
pub const MAX_SEQ_LEN: usize = 32768;

/// The inputs. Tables are row-major `[rows, hidden]`: `word` `[vocab, hidden]`, `position`
/// `[max_positions >= positions.rows_needed(seq_len), hidden]`, `token_type` `[type_vocab,
/// hidden]`; the vocabulary sizes are their row counts. Token `t` of sequence `b` uses position
/// `t` ([`Positions::Sequential`]) or the one its ids give ([`Positions::FromIds`]). Tables, γ and
/// β are of `T` (f32 or bf16).
pub struct EmbeddingInputs<'a, T = f32> {
    /// `[batch·seq_len]`, row-major `[batch, seq_len]`.
    pub input_ids: DeviceView<'a, u32>,
    /// `[batch·seq_len]`.
    pub token_type_ids: DeviceView<'a, u32>,
    pub word: DeviceView<'a, T>,
    pub position: DeviceView<'a, T>,
    pub token_type: DeviceView<'a, T>,
    /// The embedding LayerNorm, `[hidden]` each.
    pub gamma: DeviceView<'a, T>,
    pub beta: DeviceView<'a, T>,
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    /// Which position row each token reads.
    pub positions: Positions,
    /// BERT's `layer_norm_eps`.
    pub eps: f32,
}

/// The outputs: `y` `[batch·seq_len, hidden]` of activations `A` (f32 or bf16); `mean` and `rstd`
/// `[batch·seq_len]` (f32) when wanted; `error_flag` one element (see the module docs).
pub struct EmbeddingOutputs<'a, A = f32> {
    pub y: DeviceViewMut<'a, A>,
    pub mean: Option<DeviceViewMut<'a, f32>>,
    pub rstd: Option<DeviceViewMut<'a, f32>>,
    pub error_flag: DeviceViewMut<'a, u64>,
}

/// A zeroed error flag for [`embedding_layernorm_forward`].
pub fn new_error_flag(gpu: &Gpu) -> Result<DeviceBuffer<u64>> {
    gpu.alloc_zeros(1)
}

/// Reads the error flag (waiting for the stream) and returns [`Error::Input`] naming the first
/// out-of-range id, its batch row and position, when a launch found one. The flag is left as
/// it is; zero it to reuse it.
pub fn check_flag(gpu: &Gpu, flag: &DeviceView<'_, u64>) -> Result<()> {
    if flag.len() != 1 {
        return Err(Error::shape("cuda::embedding::check_flag", format!("the error flag has {} elements, expected 1", flag.len())));
    }
    let key = gpu.download(flag)?[0];
    match decode_flag(key) {
        None => Ok(()),
        Some(bad) => Err(Error::Input(bad.to_string())),
    }
}

/// The first bad token a flag names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadToken {
    pub batch: usize,
    pub position: usize,
    /// A word id (`input_ids`) rather than a token type id.
    pub is_word_id: bool,
    pub id: u32,
}

impl std::fmt::Display for BadToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, table) = if self.is_word_id { ("token id", "word embedding table") } else { ("token type id", "token type embedding table") };
        write!(f, "embedding: {what} {} at batch {}, position {} is outside the {table} (the device kernel refused it)", self.id, self.batch, self.position)
    }
}

/// Decodes the kernel's key `(0xffff − b) << 48 | (0x7fff − t) << 33 | is_word << 32 | id`;
/// `None` for zero (no bad token).
pub fn decode_flag(key: u64) -> Option<BadToken> {
    if key == 0 {
        return None;
    }
    Some(BadToken {
        batch: 0xffff - (key >> 48) as usize,
        position: 0x7fff - ((key >> 33) & 0x7fff) as usize,
        is_word_id: (key >> 32) & 1 == 1,
        id: key as u32,
    })
}

/// The lengths a launch needs, checked before anything is enqueued. Pure, so unit-tested here.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingSizes {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub input_ids: usize,
    pub token_type_ids: usize,
    pub word: usize,
    pub position: usize,
    pub token_type: usize,
    pub gamma: usize,
    pub beta: usize,
    pub y: usize,
    pub mean: Option<usize>,
    pub rstd: Option<usize>,
    pub error_flag: usize,
    pub positions: Positions,
}

/// The table row counts a valid launch reads: `(vocab, max_positions, type_vocab)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRows {
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
}

impl EmbeddingSizes {
    pub fn check(&self, eps: f32) -> Result<TableRows> {
        let (batch, seq_len, hidden) = (self.batch, self.seq_len, self.hidden);
        let fail = |msg: String| Err(Error::shape(OP, msg));
        if hidden == 0 {
            return fail("hidden must be at least 1".into());
        }
        if batch > MAX_BATCH || seq_len > MAX_SEQ_LEN {
            return fail(format!("batch {batch} and seq_len {seq_len} must be at most {MAX_BATCH} and {MAX_SEQ_LEN} (the error flag's position fields)"));
        }
        let tokens = batch * seq_len; // < 2^31 by the bounds above
        let Some(n) = tokens.checked_mul(hidden).filter(|_| hidden <= i32::MAX as usize) else {
            return fail(format!("{tokens} tokens x hidden {hidden} is too large"));
        };
        let dims = format!("batch={batch}, seq_len={seq_len}, hidden={hidden}");
        let expect = |name: &str, got: usize, want: usize, what: &str| -> Result<()> {
            if got != want {
                return Err(Error::shape(OP, format!("{name} has {got} elements, expected {want} ({what}) for {dims}")));
            }
            Ok(())
        };
        expect("input_ids", self.input_ids, tokens, "batch·seq_len")?;
        expect("token_type_ids", self.token_type_ids, tokens, "batch·seq_len")?;
        let table = |name: &str, len: usize| -> Result<usize> {
            if len == 0 || !len.is_multiple_of(hidden) || len / hidden > u32::MAX as usize {
                return Err(Error::shape(OP, format!("{name} table has {len} elements, expected a positive whole number of rows of hidden={hidden} (at most 2^32 - 1 rows)")));
            }
            Ok(len / hidden)
        };
        let rows = TableRows { vocab: table("word", self.word)?, max_positions: table("position", self.position)?, type_vocab: table("token type", self.token_type)? };
        if let Positions::FromIds { padding_idx } = self.positions {
            if padding_idx > i32::MAX as u32 {
                return fail(format!("padding_idx {padding_idx} does not fit the kernel's int"));
            }
        }
        let needed = self.positions.rows_needed(seq_len);
        if needed > rows.max_positions {
            return fail(match self.positions {
                Positions::Sequential => format!("seq_len {seq_len} exceeds the {} rows of the position table", rows.max_positions),
                Positions::FromIds { padding_idx } => format!(
                    "seq_len {seq_len} with positions from padding_idx {padding_idx} needs {needed} rows, the position table has {}",
                    rows.max_positions
                ),
            });
        }
        expect("gamma", self.gamma, hidden, "hidden")?;
        expect("beta", self.beta, hidden, "hidden")?;
        expect("y", self.y, n, "batch·seq_len·hidden")?;
        if let Some(m) = self.mean {
            expect("mean", m, tokens, "batch·seq_len")?;
        }
        if let Some(r) = self.rstd {
            expect("rstd", r, tokens, "batch·seq_len")?;
        }
        expect("error_flag", self.error_flag, 1, "one flag")?;
        if !eps.is_finite() || eps < 0.0 {
            return Err(Error::Input(format!("{OP}: eps must be finite and >= 0, got {eps}")));
        }
        Ok(rows)
    }
}

fn launch_sizes<T: BaseScalar, A: ActivationScalar>(inputs: &EmbeddingInputs<'_, T>, outputs: &EmbeddingOutputs<'_, A>) -> EmbeddingSizes {
    EmbeddingSizes {
        batch: inputs.batch,
        seq_len: inputs.seq_len,
        hidden: inputs.hidden,
        input_ids: inputs.input_ids.len(),
        token_type_ids: inputs.token_type_ids.len(),
        word: inputs.word.len(),
        position: inputs.position.len(),
        token_type: inputs.token_type.len(),
        gamma: inputs.gamma.len(),
        beta: inputs.beta.len(),
        y: outputs.y.len(),
        mean: outputs.mean.as_ref().map(|m| m.len()),
        rstd: outputs.rstd.as_ref().map(|r| r.len()),
        error_flag: outputs.error_flag.len(),
        positions: inputs.positions,
    }
}

/// `y = LayerNorm((word[id] + token_type[tt]) + position[t])` for every token, with the automatic
/// launch plan. Out-of-range ids are reported through `outputs.error_flag`: call [`check_flag`].
pub fn embedding_layernorm_forward<T: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &EmbeddingInputs<'_, T>, outputs: &mut EmbeddingOutputs<'_, A>) -> Result<()> {
    embedding_layernorm_forward_with_plan(gpu, inputs, outputs, LayerNormPlan::auto(inputs.hidden))
}

/// The kernel variant that writes `y` as `A` from tables, γ and β stored as `T`;
/// `Error::Unsupported` for a pair without one.
fn forward_kernel<T: BaseScalar, A: ActivationScalar>() -> Result<KernelName> {
    match (A::DTYPE, T::DTYPE) {
        (DType::F32, DType::F32) => Ok(EMBEDDING_LAYERNORM_FORWARD_F32),
        (DType::F32, DType::BF16) => Ok(EMBEDDING_LAYERNORM_FORWARD_BF16),
        (DType::F32, DType::F16) => Ok(EMBEDDING_LAYERNORM_FORWARD_F16),
        (DType::BF16, DType::BF16) => Ok(EMBEDDING_LAYERNORM_FORWARD_BF16IO),
        (DType::F16, DType::F16) => Ok(EMBEDDING_LAYERNORM_FORWARD_F16IO),
        (a, t) => Err(Error::Unsupported(format!("{OP}: no kernel for {a} activations with {t} embedding tables (there are: f32 with f32, bf16 or f16; bf16 with bf16; f16 with f16)"))),
    }
}

/// `(name, address, bytes)` of a view of `len` elements of `T`, for [`check_disjoint_bytes`].
fn span<T: DeviceScalar>(name: &str, ptr: u64, len: usize) -> (&str, u64, usize) {
    (name, ptr, len * std::mem::size_of::<T>())
}

/// As [`embedding_layernorm_forward`], with an explicit (validated) launch plan.
pub fn embedding_layernorm_forward_with_plan<T: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &EmbeddingInputs<'_, T>, outputs: &mut EmbeddingOutputs<'_, A>, plan: LayerNormPlan) -> Result<()> {
    let kernel = forward_kernel::<T, A>()?;
    let tables = launch_sizes(inputs, outputs).check(inputs.eps)?;
    plan.validate(inputs.hidden)?;
    // Every operand is __restrict__ in the kernel: no output may share a byte with another operand.
    let t = |name, v: &DeviceView<'_, T>| span::<T>(name, v.device_ptr(), v.len());
    let u = |name, v: &DeviceView<'_, u32>| span::<u32>(name, v.device_ptr(), v.len());
    let inputs_list = [
        u("input_ids", &inputs.input_ids),
        u("token_type_ids", &inputs.token_type_ids),
        t("word", &inputs.word),
        t("position", &inputs.position),
        t("token_type", &inputs.token_type),
        t("gamma", &inputs.gamma),
        t("beta", &inputs.beta),
    ];
    let mut outputs_list = vec![span::<A>("y", outputs.y.device_ptr(), outputs.y.len()), span::<u64>("error_flag", outputs.error_flag.device_ptr(), outputs.error_flag.len())];
    for (name, v) in [("mean", &outputs.mean), ("rstd", &outputs.rstd)] {
        if let Some(v) = v {
            outputs_list.push(span::<f32>(name, v.device_ptr(), v.len()));
        }
    }
    check_disjoint_bytes(OP, &outputs_list, &inputs_list)?;
    let rows = inputs.batch * inputs.seq_len;
    if rows == 0 {
        return Ok(());
    }
    // The kernel's parameter order; Gpu::launch checks it against kernels/embedding.cu.
    let args = [
        A::act_arg_mut(&outputs.y),
        outputs.mean.as_ref().map_or(KernelArg::Null, |m| m.arg()),
        outputs.rstd.as_ref().map_or(KernelArg::Null, |r| r.arg()),
        outputs.error_flag.arg(),
        inputs.input_ids.arg(),
        inputs.token_type_ids.arg(),
        T::base_arg(&inputs.word),
        T::base_arg(&inputs.position),
        T::base_arg(&inputs.token_type),
        T::base_arg(&inputs.gamma),
        T::base_arg(&inputs.beta),
        KernelArg::I32(rows as i32),
        KernelArg::I32(inputs.seq_len as i32),
        KernelArg::I32(inputs.hidden as i32),
        KernelArg::U32(tables.vocab as u32),
        KernelArg::U32(tables.type_vocab as u32),
        // Checked above to fit an int; -1 reads positions 0..seq_len.
        KernelArg::I32(match inputs.positions {
            Positions::Sequential => -1,
            Positions::FromIds { padding_idx } => padding_idx as i32,
        }),
        KernelArg::F32(inputs.eps),
        KernelArg::I32(plan.cache_row as i32),
    ];
    // SAFETY: every view was checked above against batch/seq_len/hidden and no output overlaps
    // another operand; the kernel reads table rows only below the row counts passed (bad ids read
    // row 0), positions below positions.rows_needed(seq_len) <= max_positions; the plan was validated against the
    // kernel's block and shared-memory contract.
    unsafe { gpu.launch(kernel, plan.launch_config(rows, inputs.hidden), &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(batch: usize, seq_len: usize, hidden: usize) -> EmbeddingSizes {
        let n = batch * seq_len;
        EmbeddingSizes {
            batch,
            seq_len,
            hidden,
            input_ids: n,
            token_type_ids: n,
            word: 11 * hidden,
            position: 16 * hidden,
            token_type: 2 * hidden,
            gamma: hidden,
            beta: hidden,
            y: n * hidden,
            mean: Some(n),
            rstd: None,
            error_flag: 1,
            positions: Positions::Sequential,
        }
    }

    #[test]
    fn consistent_sizes_pass_and_give_the_table_rows() {
        assert_eq!(sizes(3, 7, 40).check(1e-12).unwrap(), TableRows { vocab: 11, max_positions: 16, type_vocab: 2 });
        assert!(sizes(0, 7, 40).check(1e-12).is_ok());
        // RoBERTa: positions start after padding_idx, so 16 rows serve 14 tokens with padding_idx 1.
        let roberta = |seq_len| EmbeddingSizes { positions: Positions::FromIds { padding_idx: 1 }, ..sizes(1, seq_len, 8) };
        assert!(roberta(14).check(1e-12).is_ok());
        let err = roberta(15).check(1e-12).unwrap_err().to_string();
        assert!(err.contains("needs 17 rows, the position table has 16"), "{err}");
        let huge = EmbeddingSizes { positions: Positions::FromIds { padding_idx: u32::MAX }, ..sizes(1, 1, 8) };
        assert!(matches!(huge.check(1e-12), Err(Error::Shape { .. })));
    }

    #[test]
    fn every_wrong_length_is_an_error() {
        let ok = sizes(2, 5, 8);
        let cases = [
            EmbeddingSizes { input_ids: 9, ..ok },
            EmbeddingSizes { token_type_ids: 11, ..ok },
            EmbeddingSizes { word: 87, ..ok },
            EmbeddingSizes { word: 0, ..ok },
            EmbeddingSizes { position: 4 * 8, ..ok },
            EmbeddingSizes { token_type: 9, ..ok },
            EmbeddingSizes { gamma: 7, ..ok },
            EmbeddingSizes { beta: 9, ..ok },
            EmbeddingSizes { y: 79, ..ok },
            EmbeddingSizes { mean: Some(9), ..ok },
            EmbeddingSizes { rstd: Some(11), ..ok },
            EmbeddingSizes { error_flag: 2, ..ok },
            EmbeddingSizes { hidden: 0, ..ok },
            EmbeddingSizes { batch: MAX_BATCH + 1, ..ok },
            EmbeddingSizes { seq_len: MAX_SEQ_LEN + 1, ..ok },
        ];
        for c in cases {
            let err = c.check(1e-12).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{c:?}: {err}");
        }
        assert!(matches!(ok.check(f32::NAN), Err(Error::Input(_))));
    }

    #[test]
    fn flag_keys_decode_to_the_token() {
        assert_eq!(decode_flag(0), None);
        let key = |b: u64, t: u64, word: bool, id: u32| ((0xffff - b) << 48) | ((0x7fff - t) << 33) | ((word as u64) << 32) | id as u64;
        assert_eq!(decode_flag(key(1, 3, true, 40)), Some(BadToken { batch: 1, position: 3, is_word_id: true, id: 40 }));
        assert_eq!(decode_flag(key(MAX_BATCH as u64 - 1, 32767, false, u32::MAX)), Some(BadToken { batch: MAX_BATCH - 1, position: 32767, is_word_id: false, id: u32::MAX }));
        // atomicMax picks the earliest token, and its word id before its type id.
        assert!(key(0, 5, false, 0) > key(1, 0, true, 9));
        assert!(key(2, 3, true, 0) > key(2, 4, true, 9));
        assert!(key(2, 3, true, 0) > key(2, 3, false, 9));
    }
}
