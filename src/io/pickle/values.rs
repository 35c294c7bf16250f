//! The vocabulary of the interpreter: the globals a pickle may name, the values on its stack,
//! and opcode names for messages.

use std::rc::Rc;

use super::{PickledTensor, StorageDtype, StorageRef};

/// The callables and classes the pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Global {
    RebuildTensorV2,
    OrderedDict,
    Storage(StorageDtype),
}

impl Global {
    pub(super) fn resolve(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch", "FloatStorage") => Some(Global::Storage(StorageDtype::F32)),
            ("torch", "HalfStorage") => Some(Global::Storage(StorageDtype::F16)),
            ("torch", "BFloat16Storage") => Some(Global::Storage(StorageDtype::BF16)),
            _ => None,
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::OrderedDict => "collections.OrderedDict",
            Global::Storage(StorageDtype::F32) => "torch.FloatStorage",
            Global::Storage(StorageDtype::F16) => "torch.HalfStorage",
            Global::Storage(StorageDtype::BF16) => "torch.BFloat16Storage",
        }
    }
}

pub(super) const ALLOWED_GLOBALS: &str =
    "torch._utils._rebuild_tensor_v2, torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage, collections.OrderedDict";

/// Values on the stack. Tuples are shared (`Rc`) so a memo reference costs nothing to copy;
/// dicts live in an arena so that `SETITEMS` mutates the one object every reference sees.
#[derive(Clone, Debug)]
pub(super) enum Value {
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
    pub(super) fn kind(&self) -> &'static str {
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
pub(super) fn opcode_name(op: u8) -> &'static str {
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
