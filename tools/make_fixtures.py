#!/usr/bin/env python3
"""Generate the PyTorch parity fixtures for the `bert-adapters` crate.

How to run (from anywhere; the script works relative to the repo root):

    python3 -m venv /root/venv-fixtures
    /root/venv-fixtures/bin/pip install -r tools/requirements.txt
    bash scripts/fetch-model.sh                      # only needed for --minilm
    /root/venv-fixtures/bin/python tools/make_fixtures.py [--minilm models/all-MiniLM-L6-v2]

What it writes (everything under tests/fixtures/; see tests/fixtures/adapters/README.md):

  tiny_bert/            random BertConfig(vocab 120, H 48, 2 layers, 3 heads, gelu, pooler)
                        config.json, model.safetensors (HF layout, no `bert.` prefix),
                        inputs.safetensors, expected.safetensors, expected_defaults.safetensors
  tiny_bert_gelu_new/   random BertConfig(vocab 97, H 40, 3 layers, 5 heads, gelu_new,
                        3 token types, no pooler), same files minus expected_defaults
  minilm/               (only with --minilm) sentences.txt, expected.safetensors
  adapters/             AdapterHub `adapters` 1.3.0 adapters on tiny_bert (and MiniLM with
                        --minilm): saved adapter dirs, expected_*.safetensors, nice_*.safetensors,
                        README.md

Determinism: fixed seeds everywhere, CPU, float32, eval mode, eager attention,
torch.set_num_threads(2). Re-running produces byte-identical files. After writing, every
model and adapter is reloaded from disk and its outputs are checked to be bit-identical to
what was saved (the script fails with an AssertionError otherwise).
"""

import argparse
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parent.parent
FIX = Path("tests/fixtures")  # relative to REPO (we chdir there), keeps saved paths stable

BLOWUP = 25.0  # adapter weights are multiplied by this so an adapter bug cannot hide


# ---------------------------------------------------------------------------------------------
# helpers


def setup_determinism():
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def save_tensors(path, tensors):
    """Save a dict of tensors (contiguous, on CPU) and check the round trip."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    save_file(out, str(path))
    back = load_file(str(path))
    assert set(back) == set(out), path
    for k in out:
        assert torch.equal(back[k], out[k]), (path, k)
    return out


def assert_same(path, tensors):
    """Assert that `tensors` are bit-identical to the ones stored in `path`."""
    stored = load_file(str(path))
    assert set(stored) == set(tensors), (path, sorted(stored), sorted(tensors))
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        assert stored[k].shape == v.shape, (path, k, stored[k].shape, v.shape)
        assert torch.equal(stored[k], v), (
            f"{path}:{k} not reproduced, max diff {(stored[k] - v).abs().max().item()}"
        )


def run_bert(model, inputs, with_pooler=True, hidden_states=True, **extra):
    """Run a (possibly adapter-augmented) BertModel; return the dict of output tensors."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=hidden_states, return_dict=True, **extra)
    res = {"last_hidden_state": out.last_hidden_state}
    if with_pooler:
        assert out.pooler_output is not None
        res["pooler_output"] = out.pooler_output
    else:
        assert out.pooler_output is None
    if hidden_states:
        for i, h in enumerate(out.hidden_states):
            res[f"hidden_states.{i}"] = h
    return res


def perturb_bert(model, seed):
    """Make LayerNorm gammas/betas and all biases non-trivial (they are 1/0 after init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                seen.add(id(module.weight))
                seen.add(id(module.bias))
        for name, p in model.named_parameters():
            if name.endswith(".bias") and id(p) not in seen:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def make_inputs(batch, seq, vocab, lengths, n_types, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    types = torch.zeros(batch, seq, dtype=torch.int64)
    for b, length in enumerate(lengths):
        ids[b, :length] = torch.randint(1, vocab, (length,), generator=g, dtype=torch.int64)
        mask[b, :length] = 1
        for t in range(length):
            # split each real sequence into n_types consecutive segments: 0, 1, (2)
            types[b, t] = min(n_types - 1, (n_types * t) // length)
    assert ids[mask == 1].min() >= 1 and ids.max() < vocab
    for t in range(n_types):
        assert (types == t).any(), t
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def load_bert(path, pooler=True):
    model, info = BertModel.from_pretrained(str(path), attn_implementation="eager",
                                            add_pooling_layer=pooler, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    model.eval()
    assert not model.training
    return model


# ---------------------------------------------------------------------------------------------
# phase 1: plain BERT


TINY_BERT = dict(
    vocab_size=120,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=100,
    max_position_embeddings=40,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)

TINY_BERT_GELU_NEW = dict(
    vocab_size=97,
    hidden_size=40,
    num_hidden_layers=3,
    num_attention_heads=5,
    intermediate_size=70,
    max_position_embeddings=16,
    type_vocab_size=3,
    hidden_act="gelu_new",
    layer_norm_eps=1e-7,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def make_tiny(name, cfg_kwargs, pooler, seed, batch, seq, lengths, defaults):
    d = FIX / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    torch.manual_seed(seed)
    cfg = BertConfig(**cfg_kwargs)
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=pooler)
    model.eval()
    perturb_bert(model, seed + 1000)
    model.save_pretrained(str(d), safe_serialization=True)

    inputs = make_inputs(batch, seq, cfg.vocab_size, lengths, cfg.type_vocab_size, seed + 2000)
    save_tensors(d / "inputs.safetensors", inputs)
    expected = run_bert(model, inputs, with_pooler=pooler)
    assert len([k for k in expected if k.startswith("hidden_states.")]) == cfg.num_hidden_layers + 1
    save_tensors(d / "expected.safetensors", expected)
    if defaults:
        exp_def = run_bert(model, {"input_ids": inputs["input_ids"]}, with_pooler=pooler,
                           hidden_states=False)
        save_tensors(d / "expected_defaults.safetensors", exp_def)

    # self-check: reload from disk, reproduce bit-identically
    keys = sorted(load_file(str(d / "model.safetensors")).keys())
    reloaded = load_bert(d, pooler=pooler)
    assert_same(d / "expected.safetensors", run_bert(reloaded, inputs, with_pooler=pooler))
    if defaults:
        assert_same(d / "expected_defaults.safetensors",
                    run_bert(reloaded, {"input_ids": inputs["input_ids"]}, with_pooler=pooler,
                             hidden_states=False))
    print(f"[tiny] {d}: {len(keys)} weight tensors; position_ids saved: "
          f"{'embeddings.position_ids' in keys}; pooler saved: {'pooler.dense.weight' in keys}")
    return model, inputs


MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Zoë paid 3 euros at the Café in PARIS!",
    "Hello world.",
    "Rust makes memory-safe code fast.",
    "Why not?",
]


def make_minilm(model_dir):
    """MiniLM (all-MiniLM-L6-v2) forward on a small tokenized batch.

    Tokenizer: transformers.AutoTokenizer.from_pretrained(model_dir), i.e. the fast
    BertTokenizerFast built from model_dir/tokenizer.json.
    """
    from transformers import AutoTokenizer

    d = FIX / "minilm"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with open(d / "sentences.txt", "w", encoding="utf-8", newline="\n") as f:
        for s in MINILM_SENTENCES:
            f.write(s + "\n")

    weight_keys = set(load_file(str(Path(model_dir) / "model.safetensors")).keys())
    has_pooler = "pooler.dense.weight" in weight_keys
    model = load_bert(model_dir, pooler=has_pooler)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(MINILM_SENTENCES, padding=True, truncation=True,
              max_length=model.config.max_position_embeddings, add_special_tokens=True,
              return_tensors="pt", return_token_type_ids=True, return_attention_mask=True)
    inputs = {k: enc[k].to(torch.int64).contiguous()
              for k in ("input_ids", "attention_mask", "token_type_ids")}

    assert (model.pooler is not None) == has_pooler
    expected = run_bert(model, inputs, with_pooler=has_pooler)
    # Padding positions are masked out of every attention, and they are ill-conditioned: there
    # PyTorch's own float32 result differs from its float64 result by ~1.5e-4 (measured), above
    # the 1e-5·(1+max|ref|) bound that real tokens meet easily. So for padding rows we also store
    # the float64 result (rounded to f32, an error of ~1e-6 at most), and the Rust test holds us to
    # "no further from float64 than PyTorch's float32 is" there (flash-attention's 2x convention).
    model64 = load_bert(model_dir, pooler=has_pooler).double()
    expected64 = run_bert(model64, inputs, with_pooler=has_pooler)
    pad = inputs["attention_mask"].reshape(-1) == 0
    hidden = model.config.hidden_size
    for k, v in expected64.items():
        if k.startswith("hidden_states."):
            expected[f"padding_rows_f64.{k}"] = v.reshape(-1, hidden)[pad].float()
    save_tensors(d / "expected.safetensors", {**inputs, **expected})

    reloaded = load_bert(model_dir, pooler=has_pooler)
    again = run_bert(reloaded, inputs, with_pooler=has_pooler)
    again.update({k: v for k, v in expected.items() if k.startswith("padding_rows_f64.")})
    assert_same(d / "expected.safetensors", {**inputs, **again})
    print(f"[minilm] {d}: T={inputs['input_ids'].shape[1]}, pooler weights in file: {has_pooler}, "
          f"position_ids in file: {'embeddings.position_ids' in weight_keys}, "
          f"max|last_hidden_state| = {expected['last_hidden_state'].abs().max().item():.6f}")
    for s, ids in zip(MINILM_SENTENCES, inputs["input_ids"]):
        print("   ", s, "->", tok.convert_ids_to_tokens(ids.tolist()))
    return model, inputs, has_pooler



# ---------------------------------------------------------------------------------------------
# phase 2: AdapterHub `adapters` 1.3.0 bottleneck adapters


def adapter_seed(name, salt):
    """Stable per-adapter seed (independent of the order in which cases are listed)."""
    return (zlib.crc32(name.encode("utf-8")) + 7919 * salt) % (2**31)


def add_blown_up_adapter(model, name, config):
    """add_adapter (seeded), then blow the weights up so that adapter bugs cannot hide.

    Every nn.Linear inside the adapter (down, up, gate, NICE F/G sub-networks): weight *= 25,
    bias := 0.5*randn.  Adapter-internal LayerNorms (ln_before/ln_after): gamma := 1+0.1*randn,
    beta := 0.1*randn.  scaling="learned": the [1] parameter := 1.7.  scaling="channel": the
    [H] parameter := uniform(0.5, 2.0).
    """
    torch.manual_seed(adapter_seed(name, 1))
    model.add_adapter(name, config=config)
    g = torch.Generator().manual_seed(adapter_seed(name, 2))
    tag = f"adapters.{name}."
    touched = set()
    with torch.no_grad():
        for mname, module in model.named_modules():
            if tag not in mname + ".":
                continue
            if isinstance(module, torch.nn.Linear):
                if id(module.weight) not in touched:
                    module.weight.mul_(BLOWUP)
                    touched.add(id(module.weight))
                if module.bias is not None and id(module.bias) not in touched:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
                    touched.add(id(module.bias))
            elif isinstance(module, torch.nn.LayerNorm):
                if id(module.weight) not in touched:
                    module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                    touched.update((id(module.weight), id(module.bias)))
        n_params = 0
        for pname, p in model.named_parameters(remove_duplicate=False):
            if tag not in pname:
                continue
            n_params += 1
            if pname.endswith(f"{tag}scaling"):
                if p.numel() == 1:
                    p.fill_(1.7)
                else:
                    p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
                touched.add(id(p))
            assert id(p) in touched, f"adapter parameter not blown up: {pname}"
    assert n_params > 0, name
    return n_params


def save_adapter_dir(model, name, d):
    """save_adapter with safetensors; fall back to the .bin when the library refuses."""
    if d.exists():
        shutil.rmtree(d)
    note = None
    try:
        model.save_adapter(str(d), name, use_safetensors=True)
    except Exception as e:  # ln_before: "Some tensors share memory"
        msg = str(e).strip().splitlines()[0].split(":")[0]
        note = (f"`save_adapter(use_safetensors=True)` failed ({type(e).__name__}: {msg}); "
                "saved with `use_safetensors=False` instead (`pytorch_adapter.bin`, a torch.save zip "
                "of a dict key -> tensor; `adapter_norm_before.*` and `adapter_down.0.*` are the "
                "same tensors)")
        if d.exists():
            shutil.rmtree(d)
        model.save_adapter(str(d), name, use_safetensors=False)
        # Also the same state dict as safetensors, each tensor cloned so the shared LayerNorm is
        # stored under both of its keys: readers without a .bin loader can use this one.
        sd = torch.load(str(d / "pytorch_adapter.bin"), weights_only=True)
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(d / "adapter.safetensors"))
        note += " `adapter.safetensors` beside it holds the same dict (shared tensors cloned under both keys)."
    files = sorted(os.listdir(d))
    return files, note


def adapters_base(path, pooler=True):
    import adapters

    model = load_bert(path, pooler=pooler)
    adapters.init(model)
    model.eval()
    return model


def describe(tensors):
    return ", ".join(f"`{k}` {list(v.shape)}" for k, v in tensors.items())


TINY_ADAPTERS = [  # (adapter name = dir name, config string)
    ("pfeiffer", "pfeiffer"),
    ("houlsby", "houlsby"),
    ("pfeiffer_inv", "pfeiffer+inv"),
    ("houlsby_inv", "houlsby+inv"),
    ("pfeiffer_b", "pfeiffer"),
]

TINY_OPTIONS = [  # (adapter name = dir name, base config, overrides)  -- spec section 9
    ("opt_residual_before_ln_false", "pfeiffer", dict(residual_before_ln=False)),
    ("opt_ln_before_after", "houlsby", dict(ln_before=True, ln_after=True)),
    ("opt_scaling_learned", "pfeiffer", dict(scaling="learned")),
    ("opt_scaling_channel", "houlsby", dict(scaling="channel")),
    ("opt_gating", "houlsby", dict(use_gating=True)),
    ("opt_leave_out", "houlsby", dict(leave_out=[0])),
    ("opt_gelu", "pfeiffer", dict(non_linearity="gelu")),
    ("opt_rf_map", "houlsby", dict(reduction_factor={"1": 4, "default": 16})),
    ("opt_original_ln_after_false", "houlsby", dict(original_ln_after=False)),
    ("opt_post_add", "pfeiffer", dict(residual_before_ln="post_add")),
]

TINY_PARALLEL = [
    ("pfeiffer_inv", "pfeiffer"),
    ("pfeiffer", "pfeiffer_inv"),
    ("houlsby_inv", "houlsby"),
    ("houlsby", "houlsby_inv"),
    ("pfeiffer", "pfeiffer_inv", "pfeiffer_b"),
]

# Children of different configs at the same locations: the pre step follows the FIRST child and
# the post step the LAST (spec §6.4). Only last_hidden_state and pooler_output are stored.
TINY_PARALLEL_MIXED = [
    ("pfeiffer", "opt_residual_before_ln_false"),
    ("opt_residual_before_ln_false", "pfeiffer"),
    ("houlsby", "opt_original_ln_after_false"),
    ("opt_original_ln_after_false", "houlsby"),
]

MINILM_ADAPTERS = [("scorenn", "pfeiffer"), ("tasknn", "pfeiffer"), ("houlsby", "houlsby")]
MINILM_SINGLE = ["scorenn", "houlsby"]
MINILM_PARALLEL = [("scorenn", "tasknn")]


def make_adapters(minilm):
    from adapters import AdapterConfig, Parallel

    d = FIX / "adapters"
    d.mkdir(parents=True, exist_ok=True)
    for entry in sorted(d.iterdir()):
        # without --minilm, previously generated MiniLM fixtures are kept as they are
        if minilm is None and entry.name.startswith(("minilm_", "expected_minilm_")):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    tiny_dir = FIX / "tiny_bert"
    inputs = load_file(str(tiny_dir / "inputs.safetensors"))
    readme = []  # (section, lines)
    notes = []

    # ---- tiny_bert: all adapters live in one model; inactive adapters change nothing.
    model = adapters_base(tiny_dir)
    n_base = len(model.state_dict())
    cases = []  # (adapter name, config description)
    for name, cfg in TINY_ADAPTERS:
        add_blown_up_adapter(model, name, AdapterConfig.load(cfg))
        cases.append((name, f'`"{cfg}"`'))
    for name, base, over in TINY_OPTIONS:
        add_blown_up_adapter(model, name, AdapterConfig.load(base, **over))
        cases.append((name, f'`"{base}"` + `{json.dumps(over)}`'))
    model.eval()

    saved = {}
    lines = ["| adapter (= dir) | config | files in dir | expected file | tensors |", "|---|---|---|---|---|"]
    for name, desc in cases:
        files, note = save_adapter_dir(model, name, d / name)
        saved[name] = files
        if note:
            notes.append(f"`{name}`: {note}")
        model.set_active_adapters(name)
        exp = save_tensors(d / f"expected_{name}.safetensors", run_bert(model, inputs))
        lines.append(f"| `{name}` | {desc} | {', '.join(files)} | `expected_{name}.safetensors` | {describe(exp)} |")
    readme.append(("Single adapters on tiny_bert (active setup = that adapter alone)", lines))

    lines = ["| setup | expected file | tensors |", "|---|---|---|"]
    for names in TINY_PARALLEL:
        model.set_active_adapters(Parallel(*names))
        fname = f"expected_parallel_{'__'.join(names)}.safetensors"
        exp = save_tensors(d / fname, run_bert(model, inputs))
        B = inputs["input_ids"].shape[0]
        assert exp["last_hidden_state"].shape[0] == len(names) * B
        lines.append(f"| `Parallel({', '.join(names)})` | `{fname}` | {describe(exp)} |")
    for names in TINY_PARALLEL_MIXED:
        model.set_active_adapters(Parallel(*names))
        fname = f"expected_parallel_{'__'.join(names)}.safetensors"
        exp = save_tensors(d / fname, run_bert(model, inputs, hidden_states=False))
        lines.append(f"| `Parallel({', '.join(names)})` (mixed configs) | `{fname}` | {describe(exp)} |")
    readme.append(("Parallel on tiny_bert (rows i*B..(i+1)*B = branch i; hidden_states keep B rows "
                   "until the first adapter location)", lines))

    # NICE forward / inverse on a fixed random input
    lines = ["| adapter | file | tensors |", "|---|---|---|"]
    X = torch.randn(4, 11, TINY_BERT["hidden_size"], generator=torch.Generator().manual_seed(4242))
    for name in ("pfeiffer_inv", "houlsby_inv"):
        inv = model.invertible_adapters[name]
        with torch.no_grad():
            fwd = inv(X)
            bwd = inv(X, rev=True)
            rt = (inv(fwd, rev=True) - X).abs().max().item()
        exp = save_tensors(d / f"nice_{name}.safetensors", {"input": X, "forward": fwd, "inverse": bwd})
        lines.append(f"| `{name}` | `nice_{name}.safetensors` | {describe(exp)} |")
        print(f"[nice] {name}: max|forward-input| {(fwd - X).abs().max().item():.3f}, "
              f"inverse(forward(X)) - X: {rt:.3e}")
    readme.append(("NICE invertible adapter on a random input X (`forward` = "
                   "`model.invertible_adapters[name](X)`, `inverse` = `...(X, rev=True)`)", lines))
    assert len(model.state_dict()) > n_base

    # self-check: fresh model, load every saved adapter dir from disk, reproduce bit-identically
    fresh = adapters_base(tiny_dir)
    for name, _ in cases:
        st = "adapter.safetensors" in saved[name]
        loaded = fresh.load_adapter(str(d / name), use_safetensors=st)
        assert loaded == name, (loaded, name)
    fresh.eval()
    for name, _ in cases:
        fresh.set_active_adapters(name)
        assert_same(d / f"expected_{name}.safetensors", run_bert(fresh, inputs))
    for names in TINY_PARALLEL:
        fresh.set_active_adapters(Parallel(*names))
        assert_same(d / f"expected_parallel_{'__'.join(names)}.safetensors", run_bert(fresh, inputs))
    for names in TINY_PARALLEL_MIXED:
        fresh.set_active_adapters(Parallel(*names))
        assert_same(d / f"expected_parallel_{'__'.join(names)}.safetensors", run_bert(fresh, inputs, hidden_states=False))
    for name in ("pfeiffer_inv", "houlsby_inv"):
        with torch.no_grad():
            inv = fresh.invertible_adapters[name]
            assert_same(d / f"nice_{name}.safetensors", {"input": X, "forward": inv(X), "inverse": inv(X, rev=True)})
    print(f"[adapters] tiny_bert: {len(cases)} adapters, {len(TINY_PARALLEL)} Parallel setups; reload check OK")

    # ---- MiniLM
    if minilm is not None:
        mdir, m_inputs, has_pooler = minilm
        mm = adapters_base(mdir, pooler=has_pooler)
        for name, cfg in MINILM_ADAPTERS:
            add_blown_up_adapter(mm, name, AdapterConfig.load(cfg))
        mm.eval()
        for name, cfg in MINILM_ADAPTERS:
            files, note = save_adapter_dir(mm, name, d / f"minilm_{name}")
            assert note is None, note
        setups = [(n,) for n in MINILM_SINGLE] + list(MINILM_PARALLEL)
        for names in setups:
            mm.set_active_adapters(names[0] if len(names) == 1 else Parallel(*names))
            tag = names[0] if len(names) == 1 else f"parallel_{'__'.join(names)}"
            fname = f"expected_minilm_{tag}.safetensors"
            exp = save_tensors(d / fname, run_bert(mm, m_inputs, with_pooler=has_pooler, hidden_states=False))
            print(f"[adapters] minilm {names}: max|last_hidden_state| "
                  f"{exp['last_hidden_state'].abs().max().item():.4f}")
        fresh = adapters_base(mdir, pooler=has_pooler)
        for name, _ in MINILM_ADAPTERS:
            assert fresh.load_adapter(str(d / f"minilm_{name}"), use_safetensors=True) == name
        fresh.eval()
        for names in setups:
            fresh.set_active_adapters(names[0] if len(names) == 1 else Parallel(*names))
            tag = names[0] if len(names) == 1 else f"parallel_{'__'.join(names)}"
            assert_same(d / f"expected_minilm_{tag}.safetensors",
                        run_bert(fresh, m_inputs, with_pooler=has_pooler, hidden_states=False))
        print("[adapters] minilm: reload check OK")
    else:
        print("[adapters] no --minilm: MiniLM adapter fixtures left as they are")

    # README section for MiniLM, from whatever MiniLM files are on disk
    lines = ["| setup | adapter dirs | expected file | tensors |", "|---|---|---|---|"]
    for names in [(n,) for n in MINILM_SINGLE] + list(MINILM_PARALLEL):
        tag = names[0] if len(names) == 1 else f"parallel_{'__'.join(names)}"
        fname = f"expected_minilm_{tag}.safetensors"
        if not (d / fname).exists():
            continue
        setup = names[0] if len(names) == 1 else f"Parallel({', '.join(names)})"
        dirs = ", ".join(f"`minilm_{n}/`" for n in names)
        lines.append(f"| `{setup}` | {dirs} | `{fname}` | {describe(load_file(str(d / fname)))} |")
    if len(lines) > 2:
        readme.append(("MiniLM (all-MiniLM-L6-v2; inputs = `input_ids`, `attention_mask`, "
                       "`token_type_ids` of `tests/fixtures/minilm/expected.safetensors`; only "
                       "`last_hidden_state` and `pooler_output` are stored)", lines
                       + ["", "Adapter dirs: " + ", ".join(
                           f"`minilm_{n}/` (`\"{c}\"`, adapter name `{n}`)" for n, c in MINILM_ADAPTERS)]))

    write_readme(d / "README.md", readme, notes)
    for n in notes:
        print("[note]", n)


def write_readme(path, sections, notes):
    import adapters
    import transformers

    out = [
        "# Adapter parity fixtures",
        "",
        f"Generated by `tools/make_fixtures.py` (adapters {adapters.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU,",
        "float32, eval mode, eager attention). Do not edit by hand; re-run the script.",
        "",
        "Base model: `tests/fixtures/tiny_bert/` (weights, `inputs.safetensors`: `input_ids`,",
        "`attention_mask`, `token_type_ids`, all [4, 11] int64). Every adapter is created with",
        "`model.add_adapter(name, config=...)` (\"bert\" init), then blown up: every Linear weight in",
        f"the adapter (down, up, gate, NICE F/G) x{BLOWUP:g}, every Linear bias := 0.5*randn,",
        "adapter-internal LayerNorms gamma := 1+0.1*randn, beta := 0.1*randn, `scaling=\"learned\"`",
        ":= 1.7, `scaling=\"channel\"` := uniform(0.5, 2). Each adapter dir is",
        "`model.save_adapter(dir, name, use_safetensors=True)`: `adapter_config.json` +",
        "`adapter.safetensors` (no `bert.` prefix, keys as in spec section 8.1), except where noted.",
        "The adapter name inside `adapter_config.json` equals the dir name (MiniLM: without the",
        "`minilm_` prefix).",
        "",
        "Expected outputs come from `BertModel(...)(input_ids, attention_mask=..., token_type_ids=...,",
        "output_hidden_states=True)`: `last_hidden_state`, `pooler_output`, `hidden_states.<k>` (k = 0",
        "is the embedding output, after the first adapter's NICE if it has one). Under Parallel,",
        "row i*B+b is example b in branch i (children in the listed order); hidden_states keep B",
        "rows until the first adapter location. In the tables, tensors are listed with their shapes.",
        "",
    ]
    for title, lines in sections:
        out += [f"## {title}", ""] + lines + [""]
    notes = [
        "Parallel: only the FIRST child's NICE runs (once, on the embedding output, before the "
        "batch is replicated), so in `Parallel(pfeiffer_inv, pfeiffer)` the `pfeiffer` branch sees "
        "it and in `Parallel(pfeiffer, pfeiffer_inv)` the `pfeiffer_inv` branch does not. Branch 0 "
        "always equals the first adapter alone exactly.",
        "`pfeiffer_b` exists for the 3-way Parallel (a second plain pfeiffer with other weights).",
        "NICE: `inverse` is the inverse applied to `input` (not to `forward`); with the blown-up "
        "weights, inverse(forward(X)) - X is about 5e-6.",
    ] + notes
    out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(out), encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", metavar="DIR", help="all-MiniLM-L6-v2 dir (scripts/fetch-model.sh)")
    ap.add_argument("--no-adapters", action="store_true", help="plain BERT fixtures only")
    args = ap.parse_args()
    minilm_dir = Path(args.minilm).resolve() if args.minilm else None
    os.chdir(REPO)
    if minilm_dir is not None:
        # relative to the repo root, so the model_name written into adapter_config.json is stable
        minilm_dir = Path(os.path.relpath(minilm_dir, REPO))
    setup_determinism()

    make_tiny("tiny_bert", TINY_BERT, pooler=True, seed=0, batch=4, seq=11,
              lengths=[11, 7, 3, 9], defaults=True)
    make_tiny("tiny_bert_gelu_new", TINY_BERT_GELU_NEW, pooler=False, seed=1, batch=3, seq=9,
              lengths=[9, 5, 2], defaults=False)
    minilm = make_minilm(minilm_dir) if minilm_dir else None

    if not args.no_adapters:
        make_adapters((minilm_dir, minilm[1], minilm[2]) if minilm else None)


if __name__ == "__main__":
    main()
