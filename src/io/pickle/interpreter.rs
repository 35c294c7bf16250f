//! The pickle opcode machine: runs the subset of opcodes `torch.save(state_dict)` emits and
//! builds the state dict's tensors, refusing everything else.

use std::collections::HashMap;
use std::rc::Rc;

use super::values::{opcode_name, Global, Value, ALLOWED_GLOBALS};
use super::{PickleError, PickledTensor, StorageRef};

/// Bounds on the interpreter's state (each is far above what a state dict needs).
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
const MAX_DIMS: usize = 64;
/// A state dict nests tuples two deep (a persistent id inside the arguments of a rebuild).
const MAX_NESTING: u8 = 16;

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
