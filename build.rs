//! Generates `$OUT_DIR/kernel_registry.rs`: one module per `kernels/<family>.cu`, holding the
//! source (embedded with `include_str!`, `kernels/common.cuh` prepended so NVRTC needs no include
//! path) and one typed constant per `extern "C" __global__ void NAME` kernel, so a misspelled
//! kernel name is a compile error rather than a `CUDA_ERROR_NOT_FOUND` at run time.
//!
//! A problem in the kernel folder (bad file name, unnamed or C++-mangled kernel, duplicate name)
//! stops the build with a message naming the file: failing here is cheaper than on a GPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const COMMON_HEADER: &str = "common.cuh";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // A directory here makes cargo rerun when any file below it changes, is added or removed.
    println!("cargo:rerun-if-changed=kernels");

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");

    match generate(&kernel_dir) {
        Ok(code) => {
            let dest = out_dir.join("kernel_registry.rs");
            if let Err(e) = std::fs::write(&dest, code) {
                panic!("cannot write {}: {e}", dest.display());
            }
        }
        Err(msg) => panic!("kernel registry: {msg}"),
    }

    #[cfg(feature = "cuda-sim")]
    if let Err(msg) = sim::build(&manifest, &out_dir) {
        panic!("cuda-sim: {msg}");
    }
}

/// The `cuda-sim` CPU executor: compiles src/cuda/sim/*.cpp and, per kernel family, one C++
/// translation unit holding `sim.cuh`, then `kernels/common.cuh` and the family's text inside
/// `namespace bert_sim_<family>`, with `#line` markers naming the real files. The only rewrites are
/// of shared-memory declarations, on the same line (see `rewrite_shared`). The planted-bug
/// kernels of tests/sim_kernels/*.cu are compiled the same way (test material, not kernels/).
/// Everything is compiled with `-g` (about 0.4 s more per large runtime file) so that a fault in kernel
/// code can be reported with its source line.
#[cfg(feature = "cuda-sim")]
mod sim {
    use super::*;

    pub fn build(manifest: &Path, out_dir: &Path) -> Result<(), String> {
        println!("cargo:rerun-if-changed=src/cuda/sim");
        println!("cargo:rerun-if-changed=tests/sim_kernels");
        let common_path = manifest.join("kernels").join(COMMON_HEADER);
        let common = if common_path.is_file() { Some(rewrite_shared(&read(&common_path)?, &format!("kernels/{COMMON_HEADER}"))?) } else { None };
        let mut files = Vec::new();
        for dir in ["kernels", "tests/sim_kernels"] {
            let Ok(entries) = std::fs::read_dir(manifest.join(dir)) else { continue };
            let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            files.extend(paths.into_iter().filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cu")).map(|p| (dir, p)));
        }
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++20")
            .opt_level(2)
            .debug(true)
            .flag("-ffp-contract=off")
            .flag("-fno-strict-aliasing")
            .flag_if_supported("-Wno-unknown-pragmas")
            .flag_if_supported("-Wno-unused-parameter")
            .include(manifest.join("src/cuda/sim"))
            // Stub <cuda_bf16.h> / <cuda_fp16.h>: for the executor only, never for NVRTC.
            .include(manifest.join("src/cuda/sim/include"))
            .file(manifest.join("src/cuda/sim/sim_runtime.cpp"))
            .file(manifest.join("src/cuda/sim/sim_context.cpp"))
            .file(manifest.join("src/cuda/sim/sim_memory.cpp"));
        let mut table = String::from("#include \"sim.cuh\"\n");
        let mut entries = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (dir, path) in &files {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let rel = format!("{dir}/{}", path.file_name().and_then(|n| n.to_str()).unwrap_or_default());
            let text = read(path)?;
            let kernels = find_kernels(&text, path)?;
            for k in &kernels {
                if let Some(other) = seen.insert(k.clone(), rel.clone()) {
                    return Err(format!("kernel `{k}` is defined in both {other} and {rel}"));
                }
            }
            let ns = format!("bert_sim_{}", stem.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            let mut unit = String::from("#include \"sim.cuh\"\n");
            let _ = writeln!(unit, "namespace {ns} {{");
            if let Some(c) = &common {
                let _ = writeln!(unit, "#line 1 \"kernels/{COMMON_HEADER}\"");
                unit.push_str(c);
                unit.push('\n');
            }
            let _ = writeln!(unit, "#line 1 \"{rel}\"");
            unit.push_str(&rewrite_shared(&text, &rel)?);
            unit.push_str("\n#line 100000 \"(cuda-sim generated)\"\n");
            for k in &kernels {
                let _ = writeln!(unit, "static void sim_launch_{k}(void** args) {{ ::sim::call(&{k}, args); }}");
                let _ = writeln!(
                    unit,
                    "extern const ::sim::KernelEntry sim_entry_{k} = {{\"{k}\", \"{stem}\", ::sim::param_count(&{k}), &sim_launch_{k}}};"
                );
                let _ = writeln!(table, "namespace {ns} {{ extern const ::sim::KernelEntry sim_entry_{k}; }}");
                entries.push(format!("&{ns}::sim_entry_{k}"));
            }
            unit.push_str("}\n");
            let dest = out_dir.join(format!("sim_{ns}.cpp"));
            std::fs::write(&dest, unit).map_err(|e| format!("{}: {e}", dest.display()))?;
            build.file(dest);
        }
        let _ = writeln!(table, "extern \"C\" const ::sim::KernelEntry* const bert_sim_kernels[] = {{{}}};", entries.join(", "));
        let _ = writeln!(table, "extern \"C\" const size_t bert_sim_kernel_total = {};", entries.len());
        let dest = out_dir.join("sim_table.cpp");
        std::fs::write(&dest, table).map_err(|e| format!("{}: {e}", dest.display()))?;
        build.file(dest);
        // Check-only commands (clippy, doc) link nothing, so .ci/run sets this for them and saves
        // the executor's C++ compile (~1 minute on one core); the units above are still generated,
        // so a shared-memory declaration the executor cannot rewrite still fails here.
        println!("cargo:rerun-if-env-changed={CHECK_ONLY_VAR}");
        if std::env::var_os(CHECK_ONLY_VAR).is_some_and(|v| v == "1") {
            return Ok(());
        }
        build.try_compile("bert_cuda_sim").map_err(|e| e.to_string())
    }

    /// Set to 1 by `.ci/run` for `cargo clippy` and `cargo doc`: skip compiling the executor.
    const CHECK_ONLY_VAR: &str = "BERT_ADAPTERS_SIM_CHECK_ONLY";

    /// Rewrites every shared-memory declaration on its own line, so `#line` numbering stays exact:
    /// - `extern __shared__ T name[];` (function scope) -> `SIM_EXTERN_SHARED(T, name);`, the
    ///   launch's dynamic shared memory;
    /// - `__shared__ T name[N]...;` or `__shared__ T name;` -> `SIM_SHARED(name, T name[N]...);`,
    ///   storage that the first thread of each block to reach the declaration poisons
    ///   (`SIM_SHARED_GLOBAL` at file scope: poisoned at every block's start).
    ///
    /// Any other use of `__shared__` (several declarators, an initializer, qualifiers before it,
    /// a macro body, a declaration spanning lines) stops the build naming the file and line.
    fn rewrite_shared(text: &str, rel: &str) -> Result<String, String> {
        let (code, depths) = blank_comments(text);
        let mut out = String::with_capacity(text.len() + 256);
        for (no, (line, code_line)) in text.split_inclusive('\n').zip(code.split_inclusive('\n')).enumerate() {
            let hits = find_word(code_line, "__shared__");
            let Some(&at) = hits.first() else {
                out.push_str(line);
                continue;
            };
            let lno = no + 1;
            let here = |what: &str| format!("{rel}:{lno}: {what}");
            if hits.len() > 1 {
                return Err(here("one `__shared__` declaration per line, please (cuda-sim rewrites each on its line)"));
            }
            if code_line.trim_start().starts_with('#') {
                return Err(here("cuda-sim cannot rewrite `__shared__` inside a preprocessor directive or macro"));
            }
            let before = &code_line[..at];
            let (prefix, is_extern) = match before.trim_end().strip_suffix("extern") {
                Some(p) if p.is_empty() || p.ends_with(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) => (p, true),
                _ => (before, false),
            };
            if !(prefix.trim().is_empty() || prefix.trim_end().ends_with([';', '{', '}'])) {
                return Err(here(&format!("cannot rewrite `{}` (cuda-sim expects the declaration to start with `__shared__` or `extern __shared__`)", code_line.trim())));
            }
            let rest = &code_line[at + "__shared__".len()..];
            let semi = rest.find(';').ok_or_else(|| here("a `__shared__` declaration must end on its line"))?;
            let decl = rest[..semi].trim();
            let file_scope = depths.get(no).is_none_or(|&d| d == 0);
            let rewritten = if is_extern {
                if file_scope {
                    return Err(here("cuda-sim supports `extern __shared__` only inside a function"));
                }
                let bad = || here(&format!("cannot rewrite `extern __shared__ {decl}` (expected `extern __shared__ T name[];`)"));
                let d = decl.strip_suffix("[]").ok_or_else(bad)?.trim_end();
                let split = d.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).ok_or_else(bad)?;
                let (ty, name) = (d[..=split].trim(), &d[split + 1..]);
                if ty.is_empty() || !is_c_identifier(name) {
                    return Err(bad());
                }
                format!("SIM_EXTERN_SHARED({ty}, {name});")
            } else {
                let (ty, name, dims) = split_shared_decl(decl)
                    .ok_or_else(|| here(&format!("cannot rewrite `__shared__ {decl}` (expected `__shared__ T name;` or `__shared__ T name[N]...;`, one name, no initializer)")))?;
                let mac = if file_scope { "SIM_SHARED_GLOBAL" } else { "SIM_SHARED" };
                format!("{mac}({name}, {ty} {name}{dims});")
            };
            out.push_str(prefix);
            out.push_str(&rewritten);
            out.push_str(&rest[semi + 1..]);
        }
        Ok(out)
    }

    /// `T name[A][B]` -> (`T`, `name`, `[A][B]`); `T name` -> (`T`, `name`, ``). None for an
    /// initializer, several declarators or anything else not of that shape.
    fn split_shared_decl(decl: &str) -> Option<(&str, &str, &str)> {
        if decl.contains('=') {
            return None;
        }
        let dims_at = decl.find('[').unwrap_or(decl.len());
        let (head, dims) = (decl[..dims_at].trim_end(), &decl[dims_at..]);
        // The dimensions: only `[...]` groups.
        let mut depth = 0i32;
        for c in dims.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                c if depth == 0 && !c.is_whitespace() => return None,
                _ => {}
            }
        }
        if depth != 0 {
            return None;
        }
        let split = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        let (ty, name) = (head[..=split].trim(), &head[split + 1..]);
        // A comma outside template brackets means several declarators.
        let mut angle = 0i32;
        for c in ty.chars() {
            match c {
                '<' => angle += 1,
                '>' => angle -= 1,
                ',' if angle == 0 => return None,
                _ => {}
            }
        }
        (!ty.is_empty() && !ty.ends_with([',', '*', '&']) && is_c_identifier(name)).then_some((ty, name, dims.trim()))
    }

    /// Byte offsets where `word` occurs as a whole identifier.
    fn find_word(s: &str, word: &str) -> Vec<usize> {
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let b = s.as_bytes();
        s.match_indices(word)
            .map(|(i, _)| i)
            .filter(|&i| (i == 0 || !ident(b[i - 1])) && b.get(i + word.len()).is_none_or(|&c| !ident(c)))
            .collect()
    }

    /// The text with comments blanked to spaces (newlines kept, so lines and byte offsets match the
    /// original) and the brace depth at the start of each line (braces in comments and literals
    /// not counted).
    fn blank_comments(src: &str) -> (String, Vec<usize>) {
        let b = src.as_bytes();
        let mut out = b.to_vec();
        let mut depths = vec![0usize];
        let mut depth = 0usize;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\n' => {
                    depths.push(depth);
                    i += 1;
                }
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    while i < b.len() && b[i] != b'\n' {
                        out[i] = b' ';
                        i += 1;
                    }
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
                    while i < end {
                        if b[i] == b'\n' {
                            depths.push(depth);
                        } else {
                            out[i] = b' ';
                        }
                        i += 1;
                    }
                }
                q @ (b'"' | b'\'') => {
                    i += 1;
                    while i < b.len() && b[i] != q && b[i] != b'\n' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'{' => {
                    depth += 1;
                    i += 1;
                }
                b'}' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                _ => i += 1,
            }
        }
        // Only ASCII bytes were replaced, each by a space: still UTF-8.
        (String::from_utf8(out).unwrap_or_default(), depths)
    }
}

struct Family {
    module: String,
    file_name: String,
    path: PathBuf,
    kernels: Vec<Signature>,
}

/// A kernel's name and its parameters as (Rust `ParamKind` expression, parameter name).
struct Signature {
    name: String,
    params: Vec<(String, String)>,
}

fn generate(kernel_dir: &Path) -> Result<String, String> {
    let mut families = Vec::new();
    let mut common = None;
    if kernel_dir.is_dir() {
        let entries = std::fs::read_dir(kernel_dir).map_err(|e| format!("{}: {e}", kernel_dir.display()))?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort(); // deterministic output, independent of directory order
        for path in paths {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if file_name == COMMON_HEADER {
                let text = read(&path)?;
                if tokenize(&strip_comments(&text)).iter().any(|t| t == "__global__") {
                    return Err(format!("{}: kernels belong in a .cu file, not the shared header", path.display()));
                }
                common = Some(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("cu") {
                continue;
            }
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            if !is_rust_module_name(&stem) {
                return Err(format!(
                    "{}: the file stem must be a lowercase Rust identifier (it becomes `registry::{stem}`)",
                    path.display()
                ));
            }
            let kernels = kernel_signatures(&read(&path)?, &path)?;
            if kernels.is_empty() {
                return Err(format!("{}: no `extern \"C\" __global__ void NAME(` kernel found", path.display()));
            }
            families.push(Family { module: stem, file_name, path, kernels });
        }
    }

    // Kernel names are the runtime's function-cache key and must be unique across files.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for f in &families {
        for k in &f.kernels {
            if let Some(other) = seen.insert(&k.name, &f.file_name) {
                return Err(format!("kernel `{}` is defined in both {other} and {}", k.name, f.file_name));
            }
        }
    }

    let mut out = String::new();
    out.push_str("// @generated by build.rs from kernels/*.cu; do not edit.\n\n");
    for f in &families {
        let _ = writeln!(out, "/// `kernels/{}`{}.", f.file_name, if common.is_some() { " with `kernels/common.cuh` prepended" } else { "" });
        let _ = writeln!(out, "pub mod {} {{", f.module);
        out.push_str("    use super::{KernelName, KernelParam, KernelSource, ParamKind, ScalarType};\n\n");
        out.push_str("    pub const SOURCE: KernelSource = KernelSource {\n");
        let _ = writeln!(out, "        family: {:?},", f.module);
        let _ = writeln!(out, "        file: {:?},", format!("kernels/{}", f.file_name));
        out.push_str("        code: concat!(\n");
        if let Some(c) = &common {
            // #line keeps NVRTC diagnostics pointing at the real file and line.
            let _ = writeln!(out, "            {:?},", format!("#line 1 \"{COMMON_HEADER}\"\n"));
            let _ = writeln!(out, "            include_str!({:?}),", path_str(c)?);
        }
        let _ = writeln!(out, "            {:?},", format!("\n#line 1 \"{}\"\n", f.file_name));
        let _ = writeln!(out, "            include_str!({:?}),", path_str(&f.path)?);
        out.push_str("        ),\n");
        let names: Vec<String> = f.kernels.iter().map(|k| format!("{:?}", k.name)).collect();
        let _ = writeln!(out, "        kernels: &[{}],", names.join(", "));
        out.push_str("    };\n");
        for k in &f.kernels {
            let name = &k.name;
            let params: Vec<String> =
                k.params.iter().map(|(kind, pname)| format!("KernelParam {{ name: {pname:?}, kind: {kind} }}")).collect();
            let _ = writeln!(out, "\n    /// `{name}` in `kernels/{}`.", f.file_name);
            let _ = writeln!(
                out,
                "    pub const {}: KernelName = KernelName {{ source: &SOURCE, name: {name:?}, params: &[{}] }};",
                name.to_ascii_uppercase(),
                params.join(", ")
            );
        }
        out.push_str("}\n\n");
    }
    out.push_str("/// Every kernel source in `kernels/`, in file-name order.\n");
    let all: Vec<String> = families.iter().map(|f| format!("&{}::SOURCE", f.module)).collect();
    let _ = writeln!(out, "pub const ALL_SOURCES: &[&KernelSource] = &[{}];", all.join(", "));
    Ok(out)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str().ok_or_else(|| format!("{}: path is not UTF-8, cannot include_str! it", path.display()))
}

fn is_rust_module_name(s: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern", "false", "fn",
        "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "self",
        "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where", "while", "gen", "try",
    ];
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !KEYWORDS.contains(&s)
}

/// Kernel names declared as `extern "C" __global__ [__launch_bounds__(...)] void NAME(` after
/// comments are removed. Any other `__global__` is an error: a C++-mangled name cannot be loaded
/// by its plain name, and a silent miss would only show up on a GPU.
fn find_kernels(text: &str, path: &Path) -> Result<Vec<String>, String> {
    let toks = tokenize(&strip_comments(text));
    let mut names = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if t != "__global__" {
            continue;
        }
        let externed = i >= 2 && toks[i - 2] == "extern" && toks[i - 1] == "\"C\"";
        if !externed {
            return Err(format!("{}: every __global__ function must be declared `extern \"C\" __global__ void NAME(`", path.display()));
        }
        let mut j = i + 1;
        if toks.get(j).map(String::as_str) == Some("__launch_bounds__") {
            j += 1; // skip the balanced parenthesised argument list
            let mut depth = 0i32;
            while let Some(t) = toks.get(j) {
                j += 1;
                match t.as_str() {
                    "(" => depth += 1,
                    ")" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        match (toks.get(j).map(String::as_str), toks.get(j + 1), toks.get(j + 2).map(String::as_str)) {
            (Some("void"), Some(name), Some("(")) if is_c_identifier(name) => names.push(name.clone()),
            _ => {
                return Err(format!(
                    "{}: cannot read the kernel name after `extern \"C\" __global__` (expected `void NAME(`)",
                    path.display()
                ))
            }
        }
    }
    Ok(names)
}

/// The kernels of `text` with their parameter lists, for the typed launch checks of the runtime
/// (`registry::KernelParam`). A parameter type the runtime cannot pack stops the build.
fn kernel_signatures(text: &str, path: &Path) -> Result<Vec<Signature>, String> {
    let names = find_kernels(text, path)?;
    let toks = tokenize(&strip_comments(text));
    let mut out = Vec::new();
    for name in names {
        // The definition is the one `NAME (` preceded by `void`.
        let at = toks
            .windows(3)
            .position(|w| w[0] == "void" && w[1] == name && w[2] == "(")
            .ok_or_else(|| format!("{}: cannot find the parameter list of `{name}`", path.display()))?;
        let mut params = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        let mut depth = 0i32;
        for t in &toks[at + 3..] {
            match t.as_str() {
                "(" | "[" | "<" => depth += 1,
                ")" if depth == 0 => break,
                ")" | "]" | ">" => depth -= 1,
                "," if depth == 0 => {
                    params.push(param_kind(&current, &name, path)?);
                    current.clear();
                    continue;
                }
                _ => {}
            }
            current.push(t);
        }
        if !current.is_empty() {
            params.push(param_kind(&current, &name, path)?);
        }
        out.push(Signature { name, params });
    }
    Ok(out)
}

/// `const float* __restrict__ x` -> (`ParamKind::Pointer(ScalarType::F32)`, `x`).
fn param_kind(toks: &[&str], kernel: &str, path: &Path) -> Result<(String, String), String> {
    let text = toks.join(" ");
    let bad = |why: &str| format!("{}: kernel `{kernel}`, parameter `{text}`: {why}", path.display());
    let (name, ty) = toks.split_last().ok_or_else(|| bad("empty parameter"))?;
    if !is_c_identifier(name) {
        return Err(bad("expected `TYPE NAME`"));
    }
    let pointers = ty.iter().filter(|t| **t == "*").count();
    let base: Vec<&str> = ty.iter().copied().filter(|t| !matches!(*t, "*" | "const" | "__restrict__" | "volatile")).collect();
    let scalar = match base.join(" ").as_str() {
        "float" => "F32",
        "double" => "F64",
        "__half" => "F16",
        "__nv_bfloat16" => "BF16",
        "int" | "int32_t" => "I32",
        "unsigned" | "unsigned int" | "uint32_t" => "U32",
        "long long" | "int64_t" => "I64",
        "unsigned long long" | "uint64_t" | "size_t" => "U64",
        "unsigned short" | "uint16_t" => "U16",
        "unsigned char" | "uint8_t" => "U8",
        other => return Err(bad(&format!("type `{other}` cannot be packed by the launch runtime (use float, __half, __nv_bfloat16, int, unsigned, long long, unsigned long long, unsigned short, unsigned char or a pointer to one)"))),
    };
    let kind = match pointers {
        0 => format!("ParamKind::Scalar(ScalarType::{scalar})"),
        1 => format!("ParamKind::Pointer(ScalarType::{scalar})"),
        _ => return Err(bad("pointers to pointers cannot be passed")),
    };
    Ok((kind, name.to_string()))
}

fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `//` and `/* */` comments with a space; string and char literals are kept intact.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                out.push(b' ');
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
                out.push(b' ');
            }
            q @ (b'"' | b'\'') => {
                out.push(q);
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        out.push(b[i]);
                        i += 1;
                    }
                    out.push(b[i]);
                    i += 1;
                }
                if i < b.len() {
                    out.push(q);
                    i += 1;
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Identifiers/numbers, string literals (with quotes) and single punctuation characters.
fn tokenize(src: &str) -> Vec<String> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            toks.push(chars[start..i].iter().collect());
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
            toks.push(chars[start..i].iter().collect());
        } else {
            toks.push(c.to_string());
            i += 1;
        }
    }
    toks
}
