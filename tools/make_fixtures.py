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
  training/             (needs adapters/) autograd gradients of a probe loss, classification-head
                        cross-entropy gradients (BertAdapterModel flex heads), AdamW steps (alone,
                        with clipping, and alternating under Parallel); README.md

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

# (adapter name, base config, overrides). reduction_factor 64 (m = 384 // 64 = 6) keeps the three
# MiniLM adapter dirs small (tests/fixtures has a 5 MB budget).
MINILM_RF = {"reduction_factor": 64}
MINILM_ADAPTERS = [("scorenn", "pfeiffer", MINILM_RF), ("tasknn", "pfeiffer", MINILM_RF),
                   ("houlsby", "houlsby", MINILM_RF)]
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
        for name, cfg, over in MINILM_ADAPTERS:
            add_blown_up_adapter(mm, name, AdapterConfig.load(cfg, **over))
        mm.eval()
        for name, _, _ in MINILM_ADAPTERS:
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
        for name, _, _ in MINILM_ADAPTERS:
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
                           f"`minilm_{n}/` (`\"{c}\"` + `{json.dumps(o)}`, adapter name `{n}`)"
                           for n, c, o in MINILM_ADAPTERS)]))

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
# phase 3: training (autograd gradients, classification heads, AdamW) on tiny_bert


TRAIN_DIR = FIX / "training"
HEAD_BLOWUP = 5.0  # classification-head Linear weights are multiplied by this
HEAD_KW = dict(num_labels=3, layers=2, activation_function="tanh", use_pooler=False)
CE_LABELS = [2, 0, 1, 2]  # int64 [4], all three classes present
ADAMW_KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

PROBE_SINGLE = [n for n, _ in TINY_ADAPTERS if n != "pfeiffer_b"] + [n for n, _, _ in TINY_OPTIONS]
PROBE_PARALLEL_PAIRS = [("pfeiffer_inv", "pfeiffer"), ("pfeiffer", "pfeiffer_inv"),
                        ("houlsby_inv", "houlsby"), ("houlsby", "houlsby_inv")]


def probe_cases():
    """[(case name, setup children, trained adapters)]; one child = a single adapter."""
    cases = [(n, (n,), (n,)) for n in PROBE_SINGLE]
    for pair in PROBE_PARALLEL_PAIRS:
        for t in pair:
            cases.append((f"parallel_{'__'.join(pair)}__train_{t}", pair, (t,)))
    both = ("pfeiffer_inv", "pfeiffer")
    cases.append((f"parallel_{'__'.join(both)}__train_both", both, both))
    return cases


def strip_bert(key):
    return key[len("bert."):] if key.startswith("bert.") else key


def trainable_params(model):
    """{state-dict key without `bert.`: parameter} of every requires_grad parameter, in
    named_parameters order. A parameter registered under two names (ln_before: the LayerNorm is
    both `adapter_norm_before` and `adapter_down.0`) appears once, under `adapter_norm_before`."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        name = strip_bert(name)
        if id(p) in by_id:
            names = sorted([by_id[id(p)][0], name])
            assert ".adapter_down.0." in names[0] and ".adapter_norm_before." in names[1], names
            by_id[id(p)] = (names[1], p)
            continue
        by_id[id(p)] = (name, p)
    out = dict(by_id.values())
    assert len(out) == len(by_id)
    return out


def adapter_file_keys(name, load_as=None):
    """The keys of a saved adapter dir (what the trained set must be), duplicates folded."""
    keys = set(load_file(str(FIX / "adapters" / name / "adapter.safetensors")).keys())
    folded = set()
    for k in keys:
        if ".adapter_down.0." in k and k.replace(".adapter_down.0.", ".adapter_norm_before.") in keys:
            continue  # the ln_before LayerNorm, stored under both names
        folded.add(k)
    if load_as is not None:
        folded = {k.replace(f"adapters.{name}.", f"adapters.{load_as}.") for k in folded}
    return folded


def grads_of(params):
    """{grad.<key>: gradient}; a trainable parameter that got no gradient is stored as zeros."""
    return {f"grad.{k}": (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in params.items()}


def probe_W(case, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(adapter_seed(case, 3)))


def tiny_with_adapters(names):
    model = adapters_base(FIX / "tiny_bert")
    for n in names:
        assert model.load_adapter(str(FIX / "adapters" / n), use_safetensors=True) == n
    return model


def setup_of(children):
    from adapters import Parallel

    return children[0] if len(children) == 1 else Parallel(*children)


def enter_training(model, train, setup):
    """train_adapter(T) (requires_grad flags; it also makes T the active setup and calls
    model.train()), then eval() (no dropout) and re-activate the setup S we want."""
    model.train_adapter(setup_of(train))
    model.eval()
    model.set_active_adapters(setup_of(setup))
    assert not any(m.training for m in model.modules())


def run_probe(case, setup, train, inputs, W=None, with_branch_split=False):
    model = tiny_with_adapters(dict.fromkeys(setup))
    enter_training(model, train, setup)
    params = trainable_params(model)
    expected = set().union(*(adapter_file_keys(t) for t in train))
    assert set(params) == expected, (case, sorted(set(params) ^ expected))
    out = model(**inputs, return_dict=True).last_hidden_state
    assert out.shape[0] == len(setup) * inputs["input_ids"].shape[0], out.shape
    if W is None:
        W = probe_W(case, out.shape)
    loss = (out * W).sum()
    loss.backward()
    res = {"W": W, "loss": loss.detach().reshape(1), "last_hidden_state": out.detach()}
    res.update(grads_of(params))
    nones = sorted(k for k, p in params.items() if p.grad is None)
    return res, nones


def nice_grads(res):
    return {k: v for k, v in res.items() if k.startswith("grad.invertible_adapters.")}


def check_nice_gradients(inputs, results):
    """Parallel: the FIRST child's NICE runs once, before replication, so its gradient is the
    sum over both branches; a later child's NICE is not applied at all (gradient 0)."""
    lines = []
    r = results["parallel_pfeiffer__pfeiffer_inv__train_pfeiffer_inv"]
    g = nice_grads(r[0])
    assert len(g) == 8 and all(torch.count_nonzero(v) == 0 for v in g.values())
    assert all(k.startswith("invertible_adapters.pfeiffer_inv.") for k in r[1]) and len(r[1]) == 8, r[1]
    lines.append("Parallel(pfeiffer, pfeiffer_inv), training pfeiffer_inv: the 8 NICE tensors of "
                 "pfeiffer_inv get no gradient (.grad is None; stored as zeros): its NICE is not applied.")
    case = "parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv"
    full, _ = results[case]
    W = full["W"]
    B = inputs["input_ids"].shape[0]
    parts = []
    for i in range(2):
        Wi = torch.zeros_like(W)
        Wi[i * B:(i + 1) * B] = W[i * B:(i + 1) * B]
        parts.append(run_probe(case, ("pfeiffer_inv", "pfeiffer"), ("pfeiffer_inv",), inputs, W=Wi)[0])
    for k, v in nice_grads(full).items():
        n0, n1 = parts[0][k].norm().item(), parts[1][k].norm().item()
        assert n0 > 0 and n1 > 0, (k, n0, n1)
        torch.testing.assert_close(parts[0][k] + parts[1][k], v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
    for k in full:
        if k.startswith("grad.") and not k.startswith("grad.invertible_adapters."):
            assert torch.count_nonzero(parts[1][k]) == 0, k  # branch 1 never reaches pfeiffer_inv's bottleneck
    k = "grad.invertible_adapters.pfeiffer_inv.F.0.weight"
    lines.append(
        "Parallel(pfeiffer_inv, pfeiffer), training pfeiffer_inv: the NICE gradient is non-zero and is "
        "the sum of both branches' contributions (checked by masking W to one branch at a time: e.g. "
        f"|grad F.0.weight| = {full[k].norm().item():.4g}, branch 0 alone {parts[0][k].norm().item():.4g}, "
        f"branch 1 alone {parts[1][k].norm().item():.4g}; branch 0 + branch 1 = full to float rounding). "
        "Branch 1 alone gives exactly zero gradient to pfeiffer_inv's bottleneck tensors.")
    for l in lines:
        print("[training]", l)
    return lines


# ---- classification heads on BertAdapterModel


def adapter_model(loads):
    """BertAdapterModel on tiny_bert with saved adapter dirs loaded: loads = [(dir name, load_as)]."""
    from adapters import BertAdapterModel

    model, info = BertAdapterModel.from_pretrained(str(FIX / "tiny_bert"), attn_implementation="eager",
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    for d, as_ in loads:
        got = model.load_adapter(str(FIX / "adapters" / d), load_as=as_, use_safetensors=True)
        assert got == (as_ or d), got
    model.eval()
    return model


def add_blown_up_head(model, name):
    """add_classification_head (seeded by the head name), then Linear weights x5, biases 0.3*randn."""
    torch.manual_seed(adapter_seed(name, 4))
    model.add_classification_head(name, **HEAD_KW)
    head = model.heads[name]
    g = torch.Generator().manual_seed(adapter_seed(name, 5))
    linears = []
    with torch.no_grad():
        for idx, module in head.named_children():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(HEAD_BLOWUP)
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
                linears.append(idx)
    assert linears == ["1", "4"], linears
    kinds = [type(m).__name__ for m in head.children()]
    assert kinds == ["Dropout", "Linear", "Activation_Function_Class", "Dropout", "Linear"], kinds
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(f"heads.{name}.")}


def head_keys(name):
    return {f"heads.{name}.{i}.{w}" for i in (1, 4) for w in ("weight", "bias")}


def reference_logits(model, name, cls):
    """What the head computes (verified): logits = W4·tanh(W1·cls + b1) + b4."""
    sd = model.state_dict()
    p = lambda i, w: sd[f"heads.{name}.{i}.{w}"]
    return torch.tanh(cls @ p(1, "weight").T + p(1, "bias")) @ p(4, "weight").T + p(4, "bias")


def run_ce(setup, train, inputs, heads=None, loads=None):
    """Cross-entropy through the flex heads (eval mode), backward; returns (tensors, heads, model)."""
    heads = heads or list(setup)
    model = adapter_model(loads or [(n, None) for n in dict.fromkeys(setup)])
    head_sd = {}
    for h in heads:
        head_sd.update(add_blown_up_head(model, h))
    enter_training(model, train, setup)
    assert list(model.active_head if len(heads) > 1 else [model.active_head]) == heads, model.active_head
    params = trainable_params(model)
    expected = set().union(*(adapter_file_keys(t) for t in train), *(head_keys(h) for h in heads))
    assert set(params) == expected, sorted(set(params) ^ expected)
    labels = torch.tensor(CE_LABELS, dtype=torch.int64)
    out = model(**inputs, labels=labels, output_hidden_states=True, return_dict=True)
    out.loss.backward()
    B = labels.shape[0]
    last = out.hidden_states[-1].detach()
    cls = last[:, 0]
    res = {"labels": labels, "loss": out.loss.detach().reshape(1), "cls_output": cls}
    if len(setup) == 1:
        res["logits"] = out.logits.detach()
        logit_list = [res["logits"]]
    else:
        assert len(out.head_outputs) == len(setup)
        logit_list = [o.logits.detach() for o in out.head_outputs]
        for i, lg in enumerate(logit_list):
            res[f"logits.{i}"] = lg
    ce_sum = 0.0
    for i, (h, lg) in enumerate(zip(heads, logit_list)):
        assert lg.shape == (B, HEAD_KW["num_labels"])
        torch.testing.assert_close(lg, reference_logits(model, h, cls[i * B:(i + 1) * B]), rtol=0, atol=1e-5)
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(lg, labels)
    torch.testing.assert_close(res["loss"], ce_sum.reshape(1), rtol=0, atol=1e-6)
    res.update(grads_of(params))
    return res, head_sd, model


def head_config_json(model, name):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_head(tmp, name, use_safetensors=True)
        return (Path(tmp) / "head_config.json").read_text(encoding="utf-8")


# ---- AdamW


def run_adamw_parallel(inputs):
    from adapters import Parallel

    names = ("scorenn", "tasknn")
    model = adapter_model([("pfeiffer_inv", "scorenn"), ("pfeiffer", "tasknn")])
    initial = {}
    for n in names:
        initial.update(add_blown_up_head(model, n))
    S = Parallel(*names)
    groups = {}
    for n in names:
        groups[n] = [(strip_bert(k), p) for k, p in model.named_parameters()
                     if f"adapters.{n}." in k or k.startswith(f"heads.{n}.")]
    expect = {"scorenn": adapter_file_keys("pfeiffer_inv", "scorenn") | head_keys("scorenn"),
              "tasknn": adapter_file_keys("pfeiffer", "tasknn") | head_keys("tasknn")}
    for n in names:
        assert {k for k, _ in groups[n]} == expect[n], n
    opts = {n: torch.optim.AdamW([p for _, p in groups[n]], **ADAMW_KW) for n in names}
    labels = torch.tensor(CE_LABELS, dtype=torch.int64)
    res = {"labels": labels}
    ref = RefAdamW({n: groups[n] for n in names})
    for step in range(6):
        t = names[step % 2]
        model.train_adapter(t)
        model.eval()
        model.set_active_adapters(S)
        assert list(model.active_head) == list(names), model.active_head
        for o in opts.values():
            o.zero_grad()
        trainable = trainable_params(model)
        assert set(trainable) == adapter_file_keys("pfeiffer_inv" if t == "scorenn" else "pfeiffer", t) \
            | head_keys("scorenn") | head_keys("tasknn")
        out = model(**inputs, labels=labels, return_dict=True)
        out.loss.backward()
        res[f"loss.{step}"] = out.loss.detach().reshape(1)
        for k, p in groups[t]:
            assert p.grad is not None, k
            res[f"grad.{step}.{k}"] = p.grad.detach().clone()
        ref.step(groups[t])
        opts[t].step()
        ref.check()
    for n in names:
        for k, p in groups[n]:
            res[f"param.{k}"] = p.detach().clone()
    res.update({f"initial.{k}": v for k, v in initial.items()})
    return res


def run_adamw_single(inputs):
    model = tiny_with_adapters(["pfeiffer"])
    enter_training(model, ("pfeiffer",), ("pfeiffer",))
    params = trainable_params(model)
    assert set(params) == adapter_file_keys("pfeiffer")
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, **ADAMW_KW)
    W = probe_W("adamw_single", (*inputs["input_ids"].shape, TINY_BERT["hidden_size"]))
    res = {"W": W}
    ref = RefAdamW({"pfeiffer": list(params.items())})
    kp = list(params.items())
    for step in range(3):
        opt.zero_grad()
        loss = (model(**inputs, return_dict=True).last_hidden_state * W).sum()
        loss.backward()
        res[f"loss.{step}"] = loss.detach().reshape(1)
        raw = {k: p.grad.detach().clone() for k, p in kp}  # before clipping
        res.update({f"grad.{step}.{k}": g for k, g in raw.items()})
        norm = torch.nn.utils.clip_grad_norm_(plist, 1.0)
        res[f"grad_norm.{step}"] = norm.detach().reshape(1)
        ref.step(kp, grads=raw, clip=1.0, norm=norm)
        opt.step()
        ref.check()
        for k, p in kp:
            res[f"step{step}.{k}"] = p.detach().clone()
    return res


class RefAdamW:
    """Float64 re-implementation of the AdamW + clipping formulas written in the README; the
    self-check holds torch's float32 results to it (this validates the README, not torch)."""

    def __init__(self, groups):
        self.state = {}
        self.params = {}
        for n, kp in groups.items():
            for k, p in kp:
                self.params[k] = p
                self.state[k] = dict(x=p.detach().double().clone(), m=torch.zeros_like(p, dtype=torch.float64),
                                     v=torch.zeros_like(p, dtype=torch.float64), t=0)

    def step(self, kp, grads=None, clip=None, norm=None):
        """Call before torch's step (x is re-synced to torch's current value, so errors do not
        compound), then check() after it."""
        lr, (b1, b2), eps, wd = ADAMW_KW["lr"], ADAMW_KW["betas"], ADAMW_KW["eps"], ADAMW_KW["weight_decay"]
        grads = {k: (grads[k] if grads else p.grad).detach().double() for k, p in kp}
        if clip is not None:
            total = torch.sqrt(sum((g * g).sum() for g in grads.values()))
            torch.testing.assert_close(total, norm.double(), rtol=1e-5, atol=0)
            coef = min(1.0, clip / (total.item() + 1e-6))
            grads = {k: g * coef for k, g in grads.items()}
        for k, _ in kp:
            s, g = self.state[k], grads[k]
            s["x"] = self.params[k].detach().double().clone()
            s["t"] += 1
            s["x"] = s["x"] * (1 - lr * wd)
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            mhat = s["m"] / (1 - b1 ** s["t"])
            denom = torch.sqrt(s["v"]) / (1 - b2 ** s["t"]) ** 0.5 + eps
            s["x"] = s["x"] - lr * mhat / denom

    def check(self):
        for k, s in self.state.items():
            if s["t"] == 0:
                continue
            p = self.params[k].detach().double()
            err = (p - s["x"]).abs().max().item()
            assert err < 1e-5 * (1 + s["x"].abs().max().item()), (k, err)


# ---- driver


def make_training():
    d = TRAIN_DIR
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    inputs = load_file(str(FIX / "tiny_bert" / "inputs.safetensors"))
    written = {}  # file name -> tensors (for the self-check and the README)
    sections = []

    def produce():
        out = {}
        probe = {}
        for case, setup, train in probe_cases():
            probe[case] = run_probe(case, setup, train, inputs)
            out[f"grad_{case}.safetensors"] = probe[case][0]
        ce1, head_p, m1 = run_ce(("pfeiffer",), ("pfeiffer",), inputs)
        out["ce_pfeiffer.safetensors"] = ce1
        ce2, head_2, m2 = run_ce(("pfeiffer_inv", "pfeiffer"), ("pfeiffer_inv",), inputs)
        out["ce_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv.safetensors"] = ce2
        for k, v in head_p.items():  # heads are seeded by name: the same head in both cases
            assert torch.equal(head_2[k], v), k
        for h in ("pfeiffer", "pfeiffer_inv"):
            out[f"head_{h}.safetensors"] = {k: v for k, v in head_2.items() if k.startswith(f"heads.{h}.")}
        out["adamw_parallel.safetensors"] = run_adamw_parallel(inputs)
        out["adamw_single.safetensors"] = run_adamw_single(inputs)
        configs = {f"head_{h}_config.json": head_config_json(m2, h) for h in ("pfeiffer", "pfeiffer_inv")}
        assert configs["head_pfeiffer_config.json"] == head_config_json(m1, "pfeiffer")
        return out, probe, configs

    out, probe, configs = produce()
    for fname, tensors in out.items():
        written[fname] = save_tensors(d / fname, tensors)
    for fname, text in configs.items():
        (d / fname).write_text(text, encoding="utf-8")
    nice_lines = check_nice_gradients(inputs, probe)

    # self-check: everything again from scratch (fresh models, adapters reloaded from disk)
    again, _, configs2 = produce()
    assert set(again) == set(written)
    for fname, tensors in again.items():
        assert_same(d / fname, tensors)
    for fname, text in configs2.items():
        assert (d / fname).read_text(encoding="utf-8") == text, fname

    # ---- README
    def grad_count(t):
        return len([k for k in t if k.startswith("grad.")])

    lines = ["| case | setup S | trained T | file | grad tensors | other tensors |", "|---|---|---|---|---|---|"]
    for case, setup, train in probe_cases():
        fname = f"grad_{case}.safetensors"
        t = written[fname]
        n = grad_count(t)
        S = setup[0] if len(setup) == 1 else f"Parallel({', '.join(setup)})"
        T = train[0] if len(train) == 1 else f"Parallel({', '.join(train)})"
        other = {k: v for k, v in t.items() if not k.startswith("grad.")}
        zero = probe[case][1]
        zero_note = f" ({len(zero)} of them `.grad` None -> zeros)" if zero else ""
        lines.append(f"| `{case}` | `{S}` | `{T}` | `{fname}` | {n}{zero_note} | {describe(other)} |")
        print(f"[training] {fname}: {n} grad tensors{zero_note}, loss {t['loss'].item():.6g}, "
              f"max|grad| {max(v.abs().max().item() for k, v in t.items() if k.startswith('grad.')):.4g}")
    lines += ["", "Gradient tensors of every file (`grad.` + key, shape):", ""]
    for case, _, _ in probe_cases():
        t = written[f"grad_{case}.safetensors"]
        lines.append(f"- `grad_{case}.safetensors`: " + ", ".join(
            f"`{k[5:]}` {list(v.shape)}" for k, v in t.items() if k.startswith("grad.")))
    sections.append(("1. Probe-loss gradients (`BertModel` + `adapters.init`)", PROBE_INTRO + lines
                     + ["", "Checks made by the script:", ""] + [f"- {l}" for l in nice_lines]))

    lines = ["| file | tensors |", "|---|---|"]
    for fname in ("ce_pfeiffer.safetensors", "ce_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv.safetensors",
                  "head_pfeiffer.safetensors", "head_pfeiffer_inv.safetensors"):
        lines.append(f"| `{fname}` | {describe(written[fname])} |")
        if fname.startswith("ce_"):
            t = written[fname]
            heads_with_grad = sorted({k.split(".")[2] for k in t if k.startswith("grad.heads.")})
            print(f"[training] {fname}: {grad_count(t)} grad tensors (heads with gradients: {heads_with_grad}), "
                  f"loss {t['loss'].item():.6g}")
    lines += ["", "`head_pfeiffer_config.json`, `head_pfeiffer_inv_config.json`: the library's "
              "`head_config.json` for these heads (`model.save_head(dir, name)`), verbatim."]
    sections.append(("2. Classification-head cross-entropy (`BertAdapterModel`)", CE_INTRO + lines))

    lines = ["| file | tensors |", "|---|---|"]
    for fname in ("adamw_parallel.safetensors", "adamw_single.safetensors"):
        lines.append(f"| `{fname}` | {describe(written[fname])} |")
        t = written[fname]
        print(f"[training] {fname}: losses "
              + ", ".join(f"{t[k].item():.6g}" for k in t if k.startswith("loss."))
              + ("; grad norms " + ", ".join(f"{t[k].item():.6g}" for k in t if k.startswith("grad_norm."))
                 if "grad_norm.0" in t else ""))
    sections.append(("3. AdamW", ADAMW_INTRO + lines))

    write_training_readme(d / "README.md", sections)
    print(f"[training] {len(written)} safetensors files + {len(configs)} head configs; self-check "
          "(everything recomputed from scratch) bit-identical OK")


PROBE_INTRO = [
    "For each case: a fresh `BertModel.from_pretrained(\"tests/fixtures/tiny_bert\", "
    "attn_implementation=\"eager\")`, `adapters.init(model)`, every adapter of S loaded with "
    "`model.load_adapter(\"tests/fixtures/adapters/<name>\", use_safetensors=True)`, then",
    "",
    "```",
    "model.train_adapter(T)          # requires_grad: exactly T's adapter + NICE tensors (all else frozen)",
    "model.eval()                    # train_adapter called model.train(); we want no dropout",
    "model.set_active_adapters(S)    # train_adapter made T the active setup; we keep S",
    "out  = model(input_ids, attention_mask=..., token_type_ids=...).last_hidden_state   # [N*B, 11, 48]",
    "loss = (out * W).sum()          # W fixed random (seeded per case), shaped like out; padding rows included",
    "loss.backward()",
    "```",
    "",
    "Inputs: `tests/fixtures/tiny_bert/inputs.safetensors` (B=4, T=11). Each file holds `W`, "
    "`loss` [1], `last_hidden_state` and `grad.<key>` for every parameter with requires_grad=True, "
    "where `<key>` is the state-dict key (no `bert.` prefix), i.e. exactly the keys of T's "
    "`adapter.safetensors` (asserted). A trainable parameter whose `.grad` stayed None (not used by "
    "the forward) is stored as zeros. `opt_ln_before_after`: the adapter-internal LayerNorm before "
    "the down projection is ONE parameter registered as both `adapter_norm_before.*` and "
    "`adapter_down.0.*`; its gradient is stored once, under `adapter_norm_before.*` (the down "
    "projection is `adapter_down.1.*`). Under Parallel, rows i*B..(i+1)*B of `W` / "
    "`last_hidden_state` are branch i.",
    "",
]

CE_INTRO = [
    "Model: `BertAdapterModel.from_pretrained(\"tests/fixtures/tiny_bert\", attn_implementation=\"eager\")` "
    "(base keys get a `bert.` prefix inside the model; it is stripped in every stored key), "
    "adapters loaded from `tests/fixtures/adapters/<name>`, then one classification head per "
    "adapter, named like the adapter: `torch.manual_seed(s)` (s derived from the head name), "
    f"`model.add_classification_head(name, num_labels=3, layers=2, activation_function=\"tanh\", "
    f"use_pooler=False)`, then both head Linear weights x{HEAD_BLOWUP:g} and biases := 0.3*randn (seeded).",
    "",
    "Head modules (verified): `heads.<name>` is `Sequential(0: Dropout, 1: Linear(48,48), 2: tanh, "
    "3: Dropout, 4: Linear(48,3))`, so the keys are `heads.<name>.1.weight` [48, 48], "
    "`heads.<name>.1.bias` [48], `heads.<name>.4.weight` [3, 48], `heads.<name>.4.bias` [3] (no "
    "`bert.` prefix: heads live outside the base model). The dropouts are identity in eval mode.",
    "",
    "Logits (verified against this formula to 1e-5 for every head): `cls = last_hidden_state[:, 0]` "
    "(the hidden state of token 0 after the last layer, NOT the pooler: `use_pooler=False`; the "
    "pooler is computed but unused), `logits = tanh(cls·W1ᵀ + b1)·W4ᵀ + b4`. Under Parallel head i "
    "reads rows i*B..(i+1)*B (branch i) and gets the same labels. Loss = "
    "`CrossEntropyLoss()(logits, labels)` (mean over the B examples); under Parallel the library "
    "returns the SUM of the per-head losses (checked). `cls_output` in the files is the `cls` "
    "above ([N*B, 48]).",
    "",
    "Setup as in section 1 (`train_adapter(T)`, `eval()`, `set_active_adapters(S)`; with heads "
    "named like the adapters, `set_active_adapters` also makes them the active head(s)). "
    f"Labels: `{CE_LABELS}` (int64 [4]). `train_adapter` never freezes heads, so the trainable set is "
    "T's adapter tensors + EVERY head (asserted):",
    "",
    "- `ce_pfeiffer`: S = T = pfeiffer, one head `pfeiffer`; grads: 8 adapter tensors + the 4 "
    "tensors of head `pfeiffer`.",
    "- `ce_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv`: S = Parallel(pfeiffer_inv, pfeiffer), "
    "heads `pfeiffer_inv` (branch 0, `logits.0`) and `pfeiffer` (branch 1, `logits.1`), T = "
    "pfeiffer_inv; grads: pfeiffer_inv's 8 adapter + 8 NICE tensors + the 4 tensors of head "
    "`pfeiffer_inv` + the 4 tensors of head `pfeiffer` (the other child's head is trainable and gets "
    "a gradient from its own branch's loss, whose input depends on pfeiffer_inv's NICE).",
    "",
    "The heads are seeded by name, so head `pfeiffer` is the same tensor in both cases: "
    "`head_pfeiffer.safetensors`, `head_pfeiffer_inv.safetensors`.",
    "",
]

ADAMW_INTRO = [
    "torch.optim.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), default options "
    "(amsgrad=False; CPU single-tensor path). Per parameter, at step t = 1, 2, ... (t counts that "
    "parameter's own steps), with g its gradient:",
    "",
    "```",
    "x = x * (1 - lr*wd)                       # decoupled weight decay, applied first",
    "m = b1*m + (1-b1)*g                        # torch: m.lerp_(g, 1-b1)",
    "v = b2*v + (1-b2)*g*g",
    "x = x - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)",
    "```",
    "",
    "Gradient clipping (`torch.nn.utils.clip_grad_norm_(params, 1.0)`): `n = sqrt(Σ_all g²)` "
    "over every parameter of the optimizer, `g *= min(1, 1.0 / (n + 1e-6))`; it returns `n` "
    "(before clipping). The script re-implements both in float64 and checks torch against it.",
    "",
    "**`adamw_parallel.safetensors`** — `BertAdapterModel` on tiny_bert, "
    "`load_adapter(\"tests/fixtures/adapters/pfeiffer_inv\", load_as=\"scorenn\")` and "
    "`load_adapter(\"tests/fixtures/adapters/pfeiffer\", load_as=\"tasknn\")` (so their initial "
    "adapter weights are those dirs with `pfeiffer_inv`/`pfeiffer` renamed), classification heads "
    "`scorenn` and `tasknn` (as in section 2), S = Parallel(scorenn, tasknn) (scorenn first: its "
    "NICE runs before replication and feeds both branches). Optimizer `scorenn`: scorenn's 8 "
    "adapter + 8 NICE tensors + head `scorenn` (20 tensors); optimizer `tasknn`: tasknn's 8 adapter "
    "tensors + head `tasknn` (12 tensors). Steps k = 0..5: k even trains scorenn, k odd tasknn:",
    "",
    "```",
    "model.train_adapter(name); model.eval(); model.set_active_adapters(Parallel(scorenn, tasknn))",
    "opt_scorenn.zero_grad(); opt_tasknn.zero_grad()     # set_to_none",
    "loss = model(**inputs, labels=labels).loss           # sum of the two heads' mean CE",
    "loss.backward(); opt_<name>.step()",
    "```",
    "",
    "Both heads get gradients every step (heads are never frozen) but only the stepping optimizer "
    "uses them; the frozen adapter's tensors get none. `loss.<k>` is the loss of step k (before its "
    "update), `grad.<k>.<key>` the gradient of every tensor of the optimizer stepped at step k "
    "(before the update; no clipping here), `param.<key>` every scorenn/tasknn tensor after all 6 "
    "steps, `initial.<key>` the head tensors before training. Each optimizer steps 3 times (t = 1, 2, 3).",
    "",
    "**`adamw_single.safetensors`** — `BertModel` + pfeiffer (dir `tests/fixtures/adapters/pfeiffer` "
    "= the initial weights), S = T = pfeiffer, the probe loss `(last_hidden_state * W).sum()` with "
    "the stored `W`, one AdamW over pfeiffer's 8 tensors; 3 steps of: zero_grad, loss, backward, "
    "`grad_norm.<k>` = `clip_grad_norm_(params, 1.0)`, step. Stored: `loss.<k>`, `grad.<k>.<key>` "
    "(before clipping), `grad_norm.<k>` [1], `step<k>.<key>` (parameters after step k).",
    "",
]


def write_training_readme(path, sections):
    import adapters
    import transformers

    out = [
        "# Training fixtures (autograd gradients, classification heads, AdamW)",
        "",
        f"Generated by `tools/make_fixtures.py` (adapters {adapters.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU, float32, eval mode (no dropout), "
        "eager attention). Do not edit by hand; re-run the script.",
        "",
        "Base model `tests/fixtures/tiny_bert/` (H=48, 2 layers), inputs "
        "`tests/fixtures/tiny_bert/inputs.safetensors` (`input_ids`, `attention_mask`, "
        "`token_type_ids`, [4, 11] int64); adapters from the dirs in `tests/fixtures/adapters/` "
        "(blown-up weights, see its README). Shapes are listed in brackets.",
        "",
    ]
    for title, lines in sections:
        out += [f"## {title}", ""] + lines + [""]
    path.write_text("\n".join(out), encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", metavar="DIR", help="all-MiniLM-L6-v2 dir (scripts/fetch-model.sh)")
    ap.add_argument("--no-adapters", action="store_true", help="plain BERT fixtures only")
    ap.add_argument("--no-training", action="store_true", help="skip tests/fixtures/training")
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
        if not args.no_training:
            make_training()


if __name__ == "__main__":
    main()
