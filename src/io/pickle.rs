//! `pytorch_adapter.bin`: the archive `torch.save` writes, read without executing anything.
//!
//! The archive is a zip with `<prefix>/data.pkl` (a pickle) and `<prefix>/data/<key>` (the raw
//! storages), plus `byteorder` and `version` records. A pickle is a program for a stack machine
//! that may import and call any Python function; `torch.load` trusts it. This reader is an
//! interpreter for the small subset `torch.save(state_dict)` emits, and nothing else:
//!
//! * the top-level object is a `dict` or a `collections.OrderedDict` of `str` to tensor;
//! * a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
//!   OrderedDict())`, where `storage` is a persistent id
//!   `("storage", torch.{Float,Half,BFloat16}Storage, key, location, numel)`;
//! * the only globals are those four names plus `collections.OrderedDict`, and they can only be
//!   used in those positions.
//!
//! Every other opcode and global is refused with an error naming it. Sizes are checked against
//! the bytes before anything is allocated, so a hostile file costs at most its own size in
//! memory (plus bounded decompression; see [`TorchArchive`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use zip::{CompressionMethod, ZipArchive};

use crate::error::{Error, Result};

/// Largest `data.pkl` accepted. A whole BERT-large state dict pickles to under 100 KiB.
pub const MAX_PICKLE_BYTES: u64 = 4 << 20;
/// Largest total of all storages an archive may declare. Adapters are megabytes; this bounds the
/// work a lying archive can ask for.
pub const MAX_STORAGE_BYTES: u64 = 4 << 30;
/// Deflate cannot expand more than ~1032:1; a member claiming more is lying (a zip bomb).
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Bounds on the interpreter's state (each is far above what a state dict needs).
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
const MAX_DIMS: usize = 64;
/// A state dict nests tuples two deep (a persistent id inside the arguments of a rebuild).
const MAX_NESTING: u8 = 16;

/// Element types of the storages accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
        }
    }

    /// The safetensors spelling, used in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "F32",
            StorageDtype::F16 => "F16",
            StorageDtype::BF16 => "BF16",
        }
    }

    /// Little-endian bytes to f32 (F16 and BF16 widen exactly).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            StorageDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StorageDtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StorageDtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}

/// A storage as a persistent id names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// The member name under `<prefix>/data/`.
    pub key: String,
    pub dtype: StorageDtype,
    /// Number of elements of the whole storage.
    pub numel: u64,
}

/// One entry of the state dict: a contiguous view into a storage, checked to lie inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickledTensor {
    pub name: String,
    pub storage: StorageRef,
    /// Offset of the first element, in elements.
    pub offset: u64,
    pub shape: Vec<usize>,
}

impl PickledTensor {
    pub fn numel(&self) -> u64 {
        // Checked to fit when the tensor was built.
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Why a pickle was refused, with the byte offset of the opcode at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}

/// The callables and classes the pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    RebuildTensorV2,
    OrderedDict,
    Storage(StorageDtype),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch", "FloatStorage") => Some(Global::Storage(StorageDtype::F32)),
            ("torch", "HalfStorage") => Some(Global::Storage(StorageDtype::F16)),
            ("torch", "BFloat16Storage") => Some(Global::Storage(StorageDtype::BF16)),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::OrderedDict => "collections.OrderedDict",
            Global::Storage(StorageDtype::F32) => "torch.FloatStorage",
            Global::Storage(StorageDtype::F16) => "torch.HalfStorage",
            Global::Storage(StorageDtype::BF16) => "torch.BFloat16Storage",
        }
    }
}

const ALLOWED_GLOBALS: &str =
    "torch._utils._rebuild_tensor_v2, torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage, collections.OrderedDict";

/// Values on the stack. Tuples are shared (`Rc`) so a memo reference costs nothing to copy;
/// dicts live in an arena so that `SETITEMS` mutates the one object every reference sees.
#[derive(Clone, Debug)]
enum Value {
    None,
    /// True or False; no accepted position depends on which.
    Bool,
    Int(i64),
    Str(Rc<str>),
    /// Items and nesting depth (1 for a tuple of non-tuples).
    Tuple(Rc<[Value]>, u8),
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<PickledTensor>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Str(_) => "a str",
            Value::Tuple(..) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// The name of a pickle opcode, for messages about refused ones.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        _ => "unknown opcode",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for messages.
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Dict contents by arena index, in insertion order.
    dicts: Vec<Vec<(Value, Value)>>,
}

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> std::result::Result<T, PickleError> {
        Err(PickleError { offset: self.at, msg: msg.into() })
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], PickleError> {
        match self.pos.checked_add(n).filter(|&end| end <= self.data.len()) {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.err(format!(
                "{} needs {n} more bytes but only {} remain (truncated pickle)",
                opcode_name(self.data[self.at]),
                self.data.len() - self.pos
            )),
        }
    }

    fn u8(&mut self) -> std::result::Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, PickleError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// A newline-terminated ASCII line (GLOBAL's operands), at most 256 bytes.
    fn line(&mut self) -> std::result::Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(257).position(|&b| b == b'\n') else {
            return self.err("GLOBAL operand is not a newline-terminated name of at most 256 bytes");
        };
        let line = &rest[..n];
        self.pos += n + 1;
        match std::str::from_utf8(line) {
            Ok(s) if s.is_ascii() => Ok(s),
            _ => self.err("GLOBAL operand is not ASCII"),
        }
    }

    fn string(&mut self, n: u64) -> std::result::Result<Value, PickleError> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(e) => self.err(format!("string is not valid UTF-8 ({e})")),
        }
    }

    fn push(&mut self, v: Value) -> std::result::Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return self.err(format!("stack deeper than {MAX_STACK} values"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> std::result::Result<Value, PickleError> {
        // A MARK separates frames: popping below it would corrupt the enclosing tuple or dict.
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return self.err(format!("{} on an empty stack", opcode_name(self.data[self.at])));
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&self) -> std::result::Result<&Value, PickleError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return self.err(format!("{} on an empty stack", opcode_name(self.data[self.at])));
        }
        match self.stack.last() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    /// Everything above the last MARK, which is removed.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.err(format!("{} without a MARK", opcode_name(self.data[self.at])));
        };
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, idx: u32) -> std::result::Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return self.err(format!("more than {MAX_MEMO} memo entries"));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> std::result::Result<(), PickleError> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => self.err(format!("memo entry {idx} is read before it is written")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> std::result::Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of keys and values");
        }
        let Value::Dict(d) = *self.top()? else {
            return self.err(format!("{} on {}, not a dict", opcode_name(self.data[self.at]), self.top()?.kind()));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            self.dicts[d].push((k, v));
        }
        Ok(())
    }

    fn new_dict(&mut self) -> std::result::Result<Value, PickleError> {
        if self.dicts.len() >= MAX_MEMO {
            return self.err(format!("more than {MAX_MEMO} dicts"));
        }
        self.dicts.push(Vec::new());
        Ok(Value::Dict(self.dicts.len() - 1))
    }

    /// A tuple, refused when nested deeper than a state dict needs: dropping a deeply nested
    /// value recurses, and a hostile pickle could nest a million levels.
    fn tuple(&self, items: Vec<Value>) -> std::result::Result<Value, PickleError> {
        let inner = items.iter().map(|v| if let Value::Tuple(_, d) = v { *d } else { 0 }).max().unwrap_or(0);
        if inner >= MAX_NESTING {
            return self.err(format!("tuples nested more than {MAX_NESTING} deep"));
        }
        Ok(Value::Tuple(Rc::from(items), inner + 1))
    }

    fn global(&self, module: &str, name: &str) -> std::result::Result<Value, PickleError> {
        match Global::resolve(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => self.err(format!(
                "refusing to import `{module}.{name}`: the pickle asks for a global that is not a part of a tensor state dict \
                 (allowed: {ALLOWED_GLOBALS}); nothing was executed"
            )),
        }
    }

    /// BINPERSID: `("storage", StorageClass, key, location, numel)`.
    fn persistent_id(&self, pid: Value) -> std::result::Result<Value, PickleError> {
        let Value::Tuple(t, _) = &pid else {
            return self.err(format!("persistent id is {}, expected a tuple (\"storage\", class, key, location, numel)", pid.kind()));
        };
        let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), Value::Int(numel)] = &t[..] else {
            return self.err(format!(
                "persistent id is not (\"storage\", torch.FloatStorage|HalfStorage|BFloat16Storage, key, location, numel) \
                 (a tuple of {} items: {})",
                t.len(),
                t.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
            ));
        };
        if &**tag != "storage" {
            return self.err(format!("persistent id tag `{tag}`, expected \"storage\""));
        }
        // The key becomes part of a member name: keep it to what torch writes (decimal indices).
        if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return self.err(format!("storage key {key:?} is not a plain name (torch writes decimal indices)"));
        }
        let Ok(numel) = u64::try_from(*numel) else {
            return self.err(format!("storage `{key}` has a negative size {numel}"));
        };
        Ok(Value::Storage(Rc::new(StorageRef { key: key.to_string(), dtype: *dtype, numel })))
    }

    fn int_tuple(&self, v: &Value, what: &str) -> std::result::Result<Vec<usize>, PickleError> {
        let Value::Tuple(t, _) = v else {
            return self.err(format!("tensor {what} is {}, expected a tuple of ints", v.kind()));
        };
        if t.len() > MAX_DIMS {
            return self.err(format!("tensor {what} has {} dimensions (at most {MAX_DIMS})", t.len()));
        }
        t.iter()
            .map(|x| match x {
                Value::Int(i) => usize::try_from(*i).or_else(|_| self.err(format!("tensor {what} holds a negative value {i}"))),
                other => self.err(format!("tensor {what} holds {}, expected ints", other.kind())),
            })
            .collect()
    }

    fn is_empty_dict(&self, v: &Value) -> bool {
        matches!(v, Value::Dict(d) if self.dicts[*d].is_empty())
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Value]) -> std::result::Result<Value, PickleError> {
        if !(6..=7).contains(&args.len()) {
            return self.err(format!("_rebuild_tensor_v2 with {} arguments, expected 6 or 7", args.len()));
        }
        let Value::Storage(storage) = &args[0] else {
            return self.err(format!("_rebuild_tensor_v2's storage is {}, expected a persistent storage id", args[0].kind()));
        };
        let Value::Int(offset) = args[1] else {
            return self.err(format!("_rebuild_tensor_v2's storage offset is {}, expected an int", args[1].kind()));
        };
        let Ok(offset) = u64::try_from(offset) else {
            return self.err(format!("negative storage offset {offset}"));
        };
        let shape = self.int_tuple(&args[2], "size")?;
        let stride = self.int_tuple(&args[3], "stride")?;
        if !matches!(args[4], Value::Bool) {
            return self.err(format!("_rebuild_tensor_v2's requires_grad is {}, expected a bool", args[4].kind()));
        }
        // Backward hooks would be callables; only the empty OrderedDict torch writes is accepted.
        if !self.is_empty_dict(&args[5]) {
            return self.err("_rebuild_tensor_v2 with backward hooks (only an empty OrderedDict is accepted)");
        }
        if let Some(meta) = args.get(6) {
            if !matches!(meta, Value::None) && !self.is_empty_dict(meta) {
                return self.err("_rebuild_tensor_v2 with tensor metadata (only none is accepted)");
            }
        }
        if stride.len() != shape.len() {
            return self.err(format!("tensor size {shape:?} and stride {stride:?} differ in length"));
        }
        let Some(numel) = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)) else {
            return self.err(format!("tensor size {shape:?} overflows"));
        };
        // Contiguous (row-major) only: strides of size-1 dimensions do not matter, as in torch.
        let mut expect = 1u64;
        for (&d, &s) in shape.iter().zip(&stride).rev() {
            if d != 1 && s as u64 != expect {
                return self.err(format!("tensor of size {shape:?} has stride {stride:?}: only contiguous tensors are accepted"));
            }
            expect = expect.saturating_mul(d as u64);
        }
        let end = offset.checked_add(numel);
        if numel > 0 && end.is_none_or(|e| e > storage.numel) {
            return self.err(format!(
                "tensor of size {shape:?} at offset {offset} runs past the end of storage `{}` ({} elements)",
                storage.key, storage.numel
            ));
        }
        Ok(Value::Tensor(Rc::new(PickledTensor { name: String::new(), storage: (**storage).clone(), offset, shape })))
    }

    fn reduce(&mut self) -> std::result::Result<(), PickleError> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Tuple(args, _) = args else {
            return self.err(format!("REDUCE arguments are {}, expected a tuple", args.kind()));
        };
        let value = match callable {
            Value::Global(Global::RebuildTensorV2) => self.rebuild_tensor(&args)?,
            Value::Global(Global::OrderedDict) if args.is_empty() => self.new_dict()?,
            Value::Global(Global::OrderedDict) => return self.err("collections.OrderedDict called with arguments (only OrderedDict() is accepted)"),
            Value::Global(g) => return self.err(format!("refusing to call `{}`: it is only accepted inside a persistent storage id", g.describe())),
            other => return self.err(format!("REDUCE on {}, which is not a callable global", other.kind())),
        };
        self.push(value)
    }

    fn run(&mut self) -> std::result::Result<Value, PickleError> {
        loop {
            self.at = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return self.err("the pickle ends without STOP (truncated)");
            };
            self.pos += 1;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.err(format!("pickle protocol {v} (at most 5 exists)"));
                    }
                }
                0x95 => {
                    // FRAME only announces a length; the opcodes inside are read as usual.
                    let n = self.u64()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return self.err(format!("FRAME of {n} bytes runs past the end"));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_STACK {
                        return self.err("too many nested MARKs");
                    }
                    self.marks.push(self.stack.len());
                }
                b'}' => {
                    let d = self.new_dict()?;
                    self.push(d)?;
                }
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()), 1))?,
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.err(format!("LONG1 of {n} bytes does not fit 64 bits"));
                    }
                    let b = self.take(n)?;
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                0x88 | 0x89 => self.push(Value::Bool)?,
                b'N' => self.push(Value::None)?,
                b'X' => {
                    let n = self.u32()? as u64;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return self.err(format!("STACK_GLOBAL on {} and {}, expected two strings", module.kind(), name.kind()));
                    };
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_id(pid)?;
                    self.push(storage)?;
                }
                b'R' => self.reduce()?,
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'b' => {
                    // `state_dict()` is an OrderedDict with a `_metadata` attribute (version
                    // numbers); its BUILD only sets that attribute, which we do not need.
                    let state = self.pop()?;
                    if !matches!(state, Value::Dict(_) | Value::None) {
                        return self.err(format!("BUILD with {} as state (only a dict of attributes is accepted)", state.kind()));
                    }
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return self.err(format!("BUILD on {}: only an OrderedDict's attributes may be set", self.top()?.kind()));
                    }
                }
                other => {
                    return self.err(format!(
                        "opcode {} (0x{other:02x}) is not allowed: a tensor state dict does not need it; nothing was executed",
                        opcode_name(other)
                    ))
                }
            }
        }
    }
}

/// Interpret `data` (the bytes of `data.pkl`) as a state dict of tensors. Nothing is imported or
/// called; every refused construct is an error naming the opcode or global and its byte offset.
pub fn parse_state_dict(data: &[u8]) -> std::result::Result<Vec<PickledTensor>, PickleError> {
    let mut m = Machine { data, pos: 0, at: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), dicts: Vec::new() };
    let top = m.run()?;
    let Value::Dict(d) = top else {
        return m.err(format!("the pickled object is {}, expected a dict of tensors", top.kind()));
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(m.dicts[d].len());
    let mut storages: HashMap<&str, &StorageRef> = HashMap::new();
    for (k, v) in &m.dicts[d] {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            return m.err(format!("the state dict maps {} to {}, expected str to tensor", k.kind(), v.kind()));
        };
        if !seen.insert(name.clone()) {
            return m.err(format!("key `{name}` appears twice in the state dict"));
        }
        // Two views of one storage must agree on what the storage is.
        match storages.get(t.storage.key.as_str()) {
            Some(s) if **s != t.storage => {
                return m.err(format!("storage `{}` is declared twice with different dtype or size (tensor `{name}`)", t.storage.key))
            }
            Some(_) => {}
            None => {
                storages.insert(&t.storage.key, &t.storage);
            }
        }
        out.push(PickledTensor { name: name.to_string(), ..(**t).clone() });
    }
    Ok(out)
}

/// Bytes shared by the archive and its readers (a memory map or an owned buffer).
#[derive(Clone)]
struct SharedBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// Where a storage's bytes are in the archive.
#[derive(Clone, Debug)]
struct StorageEntry {
    index: usize,
    dtype: StorageDtype,
    bytes: u64,
}

/// A `torch.save` archive of a state dict, validated when opened: the pickle is interpreted, every
/// storage it references exists with exactly the size the pickle declares, and every tensor lies
/// inside its storage. Tensor data is read on request.
pub struct TorchArchive {
    path: PathBuf,
    zip: ZipArchive<Cursor<SharedBytes>>,
    tensors: Vec<PickledTensor>,
    storages: BTreeMap<String, StorageEntry>,
}

/// Whether `bytes` start like a zip archive (what `torch.save` writes since torch 1.6).
pub fn looks_like_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// The start of a legacy (torch < 1.6) `torch.save` file: protocol 2 and torch's magic number.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

/// Whether `bytes` are a `torch.save` file of either generation (never a valid safetensors
/// file: those would declare an absurd header length).
pub fn looks_like_torch(bytes: &[u8]) -> bool {
    looks_like_zip(bytes) || bytes.starts_with(LEGACY_MAGIC)
}

impl TorchArchive {
    /// Map `path` and validate it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::malformed(path, "empty file (expected a torch.save zip archive)"));
        }
        // SAFETY: read-only map; bytes changing underneath can only make reads fail or give
        // other numbers, every access is bounds-checked.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_shared(SharedBytes(Arc::new(mmap)), path)
    }

    /// Validate an archive held in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        Self::from_shared(SharedBytes(Arc::new(bytes)), origin)
    }

    fn from_shared(bytes: SharedBytes, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::malformed(path, msg);
        let data = bytes.as_ref();
        if data.is_empty() {
            return Err(bad("empty file (expected a torch.save zip archive)".into()));
        }
        if !looks_like_zip(data) {
            let legacy = data.starts_with(LEGACY_MAGIC);
            return Err(bad(if legacy {
                "a legacy (pre-zip, torch < 1.6) torch.save file, which is not supported; re-save it with a current torch".into()
            } else {
                "not a torch.save zip archive (no zip signature)".into()
            }));
        }
        let file_len = data.len() as u64;
        let mut zip = ZipArchive::new(Cursor::new(bytes.clone())).map_err(|e| bad(format!("not a readable zip archive: {e}")))?;

        // `<prefix>/data.pkl`; torch names the prefix after the file but reads any single one.
        let mut pickles = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, raw) in zip.file_names_raw().enumerate() {
            let Ok(name) = std::str::from_utf8(raw) else { continue };
            if let Some(prefix) = name.strip_suffix("/data.pkl") {
                if !prefix.is_empty() && !prefix.contains('/') {
                    pickles.push((prefix.to_string(), i));
                }
            }
            if names.insert(name.to_string(), i).is_some() {
                return Err(bad(format!("member `{name}` appears twice in the archive")));
            }
        }
        let (prefix, pkl_index) = match pickles.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad("no `<archive>/data.pkl` member: not a torch.save archive".into())),
            _ => return Err(bad(format!("{} `data.pkl` members: ambiguous archive", pickles.len()))),
        };
        let member = |suffix: &str| names.get(&format!("{prefix}/{suffix}")).copied();

        if let Some(i) = member("byteorder") {
            let order = read_member(&mut zip, i, 16, file_len).map_err(|e| bad(format!("`{prefix}/byteorder`: {e}")))?;
            if order.as_slice() != b"little" {
                return Err(bad(format!(
                    "byte order `{}`: only little-endian archives are supported",
                    String::from_utf8_lossy(&order).escape_default()
                )));
            }
        }
        let pkl = read_member(&mut zip, pkl_index, MAX_PICKLE_BYTES, file_len).map_err(|e| bad(format!("`{prefix}/data.pkl`: {e}")))?;
        let tensors = parse_state_dict(&pkl).map_err(|e| bad(format!("`{prefix}/data.pkl`: {e}")))?;

        let mut storages = BTreeMap::new();
        let mut total = 0u64;
        for t in &tensors {
            if storages.contains_key(&t.storage.key) {
                continue;
            }
            let member_name = format!("{prefix}/data/{}", t.storage.key);
            let Some(index) = member(&format!("data/{}", t.storage.key)) else {
                return Err(Error::tensor(path, &t.name, format!("its storage `{member_name}` is not in the archive")));
            };
            let want = t.storage.numel.checked_mul(t.storage.dtype.size() as u64);
            let entry = zip.by_index_raw(index).map_err(|e| bad(format!("`{member_name}`: {e}")))?;
            let (size, compressed, method) = (entry.size(), entry.compressed_size(), entry.compression());
            drop(entry);
            check_member_size(size, compressed, method, file_len).map_err(|e| bad(format!("`{member_name}`: {e}")))?;
            if want != Some(size) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "storage `{member_name}` holds {size} bytes, but the pickle declares {} {} elements",
                        t.storage.numel,
                        t.storage.dtype.name()
                    ),
                ));
            }
            total = total.saturating_add(size);
            if total > MAX_STORAGE_BYTES {
                return Err(bad(format!("storages total more than {MAX_STORAGE_BYTES} bytes; refusing to read them")));
            }
            storages.insert(t.storage.key.clone(), StorageEntry { index, dtype: t.storage.dtype, bytes: size });
        }
        Ok(TorchArchive { path: path.to_path_buf(), zip, tensors, storages })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state dict's tensors, in pickle order.
    pub fn tensors(&self) -> &[PickledTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&PickledTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// One tensor's elements as f32. Streams through its storage: the bytes before the view are
    /// skipped, the view is kept, the rest is read only to let the zip CRC check run.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| Error::tensor(&self.path, name, "not in the archive"))?;
        let entry = self.storages.get(&t.storage.key).ok_or_else(|| Error::tensor(&self.path, name, "its storage is missing"))?;
        let es = entry.dtype.size() as u64;
        // Both fit: checked against the storage size when the archive was opened.
        let (skip, len) = (t.offset * es, t.numel() * es);
        let fail = |e: std::io::Error| Error::tensor(&self.path, name, format!("reading storage `{}`: {e}", t.storage.key));
        let mut zip = self.zip.clone();
        let mut reader = zip.by_index(entry.index).map_err(|e| fail(std::io::Error::other(e)))?;
        // One byte past the declared size: reading to the member's end runs the CRC check, and
        // an overlong member shows up as extra bytes.
        let mut limited = (&mut reader).take(entry.bytes + 1);
        let skipped = std::io::copy(&mut (&mut limited).take(skip), &mut std::io::sink()).map_err(fail)?;
        if skipped != skip {
            return Err(fail(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut buf = vec![0u8; len as usize];
        limited.read_exact(&mut buf).map_err(fail)?;
        let rest = std::io::copy(&mut limited, &mut std::io::sink()).map_err(fail)?;
        if skip + len + rest != entry.bytes {
            return Err(fail(std::io::Error::other(format!("member holds {} bytes, declared {}", skip + len + rest, entry.bytes))));
        }
        Ok(entry.dtype.decode(&buf))
    }
}

/// A member's declared sizes must be possible: STORED data is as long as it says, compressed
/// data cannot expand beyond deflate's limit, and neither can exceed what the file holds.
fn check_member_size(size: u64, compressed: u64, method: CompressionMethod, file_len: u64) -> std::result::Result<(), String> {
    if compressed > file_len {
        return Err(format!("declares {compressed} compressed bytes in a file of {file_len} bytes"));
    }
    match method {
        CompressionMethod::Stored if size != compressed => Err(format!("stored member declares {size} bytes but holds {compressed}")),
        CompressionMethod::Stored => Ok(()),
        CompressionMethod::Deflated if size > compressed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024) => Err(format!(
            "declares {size} bytes from {compressed} compressed bytes, more than deflate can expand (a zip bomb); refused"
        )),
        CompressionMethod::Deflated => Ok(()),
        other => Err(format!("compression method {other:?} is not supported (torch writes members stored)")),
    }
}

/// A whole member, at most `cap` bytes, checked against its declared size.
fn read_member(zip: &mut ZipArchive<Cursor<SharedBytes>>, index: usize, cap: u64, file_len: u64) -> std::result::Result<Vec<u8>, String> {
    let mut f = zip.by_index(index).map_err(|e| e.to_string())?;
    let (size, compressed, method) = (f.size(), f.compressed_size(), f.compression());
    if size > cap {
        return Err(format!("declares {size} bytes, more than the {cap} accepted"));
    }
    check_member_size(size, compressed, method, file_len)?;
    let mut out = Vec::with_capacity(size as usize);
    (&mut f).take(size + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() as u64 != size {
        return Err(format!("holds {} bytes but declares {size}", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protocol-2 pickle of `{name: tensor}` over one FloatStorage, as torch writes it.
    fn tensor_pickle(name: &str, numel: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        p.push(b'X');
        p.extend_from_slice(&(name.len() as u32).to_le_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
        p.extend_from_slice(&[numel, b't', b'Q', b'K', 0, b'(']);
        for &s in size {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(b"t(");
        for &s in stride {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    #[test]
    fn reads_a_state_dict() {
        let t = parse_state_dict(&tensor_pickle("a.weight", 6, &[2, 3], &[3, 1])).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].name.as_str(), t[0].shape.as_slice(), t[0].offset, t[0].storage.numel), ("a.weight", &[2usize, 3][..], 0, 6));
    }

    #[test]
    fn refuses_calls_views_and_truncation() {
        let e = parse_state_dict(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").unwrap_err();
        assert!(e.msg.contains("`os.system`") && e.offset == 2, "{e}");
        let e = parse_state_dict(&tensor_pickle("w", 6, &[3, 2], &[1, 3])).unwrap_err();
        assert!(e.msg.contains("only contiguous"), "{e}");
        let e = parse_state_dict(&tensor_pickle("w", 5, &[2, 3], &[3, 1])).unwrap_err();
        assert!(e.msg.contains("runs past the end of storage `0` (5 elements)"), "{e}");
        let full = tensor_pickle("w", 6, &[2, 3], &[3, 1]);
        for cut in 0..full.len() {
            assert!(parse_state_dict(&full[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
        let e = parse_state_dict(b"\x80\x02]q\x00.").unwrap_err();
        assert!(e.msg.contains("EMPTY_LIST"), "{e}");
        let e = parse_state_dict(b"\x80\x02(cbuiltins\neval\nX\x01\x00\x00\x001o.").unwrap_err();
        assert!(e.msg.contains("builtins.eval"), "{e}");
    }

    #[test]
    fn bounds_nesting_and_counts() {
        // A million nested 1-tuples would overflow the stack when dropped.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let e = parse_state_dict(&p).unwrap_err();
        assert!(e.msg.contains("nested more than 16 deep") && e.offset == 18, "{e}");
        // A huge string length is checked against the bytes before anything is allocated.
        let e = parse_state_dict(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\x7f.").unwrap_err();
        assert!(e.msg.contains("truncated"), "{e}");
        let e = parse_state_dict(b"\x80\x02h\x05.").unwrap_err();
        assert!(e.msg.contains("memo entry 5 is read before it is written"), "{e}");
        let e = parse_state_dict(b"\x80\x02(}t(u.").unwrap_err();
        assert!(e.msg.contains("SETITEMS on a tuple"), "{e}");
    }
}
