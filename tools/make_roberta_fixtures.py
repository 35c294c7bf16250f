#!/usr/bin/env python3
"""Generate the RoBERTa / XLM-R parity fixtures for the `bert-adapters` crate (issue 17).

A sibling of tools/make_fixtures.py (same venv, same helpers, imported from it); it writes only
tests/fixtures/tiny_roberta/, so the BERT fixtures are never touched:

    /root/venv-fixtures/bin/python tools/make_roberta_fixtures.py

What it writes (see tests/fixtures/tiny_roberta/README.md, written by this script):

  config.json, model.safetensors   random RobertaConfig (vocab = tokenizer + 3, H 36, 2 layers,
                                   4 heads of 9, intermediate 70, max_position_embeddings 34 =
                                   32 tokens + padding_idx 1 + 1, type_vocab_size 1, eps 1e-5,
                                   pooler); RobertaModel.save_pretrained (no `roberta.` prefix)
  tokenizer.json (+ HF's vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
                                   a byte-level BPE trained here with the `tokenizers` package on
                                   tests/fixtures/train/reviews.csv, wrapped in RobertaTokenizerFast
                                   and saved by it: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4
  inputs.safetensors               input_ids (pad id 1 at the padded positions, and one pad id
                                   inside a sequence), attention_mask, token_type_ids (zeros)
  expected.safetensors             RobertaModel outputs (every hidden state, pooler)
  expected_defaults.safetensors    the same model on input_ids alone
  sentences.txt, expected_text.safetensors
                                   HF's fast tokenizer's ids for the sentences, and the outputs
  adapters/<name>/                 pfeiffer, houlsby, pfeiffer_inv, houlsby_inv (blown up x25),
                                   saved from RobertaModel + adapters.init (no prefix)
  adapters/flex_pfeiffer_inv/      pfeiffer_inv with a classification head, saved from
                                   RobertaAdapterModel (`roberta.` prefix, head_config.json)
  expected_<setup>.safetensors     each adapter alone and Parallel in both orders with a +inv
                                   first child (last_hidden_state, pooler_output)
  expected_flex_head.safetensors   the flex head's logits
  grad_<case>.safetensors          probe-loss gradients of a trained child (W, loss, grads)

Determinism as in make_fixtures.py (CPU, float32, eval mode, eager attention, fixed seeds); every
file is reproduced bit-identically from a fresh model reloaded from disk before the script ends.
The script also checks that XLMRobertaModel on the same weights gives bit-identical outputs.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the shared helpers: save_tensors, blow-up, run_bert, ...)

from transformers import RobertaConfig, RobertaModel  # noqa: E402

FIX = mf.FIX
D = FIX / "tiny_roberta"
AD = D / "adapters"

PAD, BOS, EOS = 1, 0, 2
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BPE_VOCAB = 280  # byte alphabet (256) + 5 specials + a few merges

TINY_ROBERTA = dict(
    hidden_size=36,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=70,
    max_position_embeddings=34,
    type_vocab_size=1,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

SENTENCES = [
    "a good film, really",
    "Zoë's café: awful!",
    "  okay  ",
    "10/10 🙂",
]

ADAPTERS = [("pfeiffer", "pfeiffer"), ("houlsby", "houlsby"), ("pfeiffer_inv", "pfeiffer+inv"),
            ("houlsby_inv", "houlsby+inv")]
PARALLEL = [("pfeiffer_inv", "pfeiffer"), ("pfeiffer", "pfeiffer_inv"), ("houlsby_inv", "houlsby"),
            ("houlsby", "houlsby_inv")]
# (case, setup, trained): every config alone, and Parallel with a +inv first child training each child.
PROBES = [(n, (n,), (n,)) for n, _ in ADAPTERS] + [
    ("parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv", ("pfeiffer_inv", "pfeiffer"), ("pfeiffer_inv",)),
    ("parallel_pfeiffer_inv__pfeiffer__train_pfeiffer", ("pfeiffer_inv", "pfeiffer"), ("pfeiffer",)),
    ("parallel_houlsby_inv__houlsby__train_houlsby_inv", ("houlsby_inv", "houlsby"), ("houlsby_inv",)),
]


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_texts():
    import csv

    with open(FIX / "train" / "reviews.csv", encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)] + SENTENCES


def make_tokenizer():
    """A byte-level BPE like roberta-base's (ByteLevel pre-tokenizer without prefix space,
    RobertaProcessing <s> ... </s>, ByteLevel decoder), saved through RobertaTokenizerFast so the
    folder holds what HF writes for a RoBERTa checkpoint (`padding` null in tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts(), trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.RobertaProcessing(sep=("</s>", EOS), cls=("<s>", BOS),
                                                      trim_offsets=True, add_prefix_space=False)
    fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                model_max_length=TINY_ROBERTA["max_position_embeddings"] - PAD - 1)
    fast.save_pretrained(str(D))  # tokenizer.json, and vocab.json + merges.txt as roberta-base has
    back = RobertaTokenizerFast.from_pretrained(str(D))
    assert back.pad_token_id == PAD and back.bos_token_id == BOS and back.eos_token_id == EOS
    assert json.loads((D / "tokenizer.json").read_text(encoding="utf-8"))["padding"] is None
    return back


def encode(tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt",
              return_token_type_ids=True, return_attention_mask=True)
    return {k: enc[k].to(torch.int64).contiguous() for k in ("input_ids", "attention_mask", "token_type_ids")}


# ---------------------------------------------------------------------------------------------
# model


def load_roberta(cls=RobertaModel, path=D):
    model, info = cls.from_pretrained(str(path), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    model.eval()
    return model


def make_inputs(vocab):
    """B=3, T=12: real padding with pad id 1 (attention 0), and a pad id INSIDE sequence 2 at
    position 4 with attention 1 (HF gives it position padding_idx and moves the rest)."""
    g = torch.Generator().manual_seed(1717)
    lengths = [12, 7, 10]
    ids = torch.full((3, 12), PAD, dtype=torch.int64)
    mask = torch.zeros(3, 12, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = BOS
        ids[b, 1:n - 1] = torch.randint(len(SPECIALS), vocab, (n - 2,), generator=g)
        ids[b, n - 1] = EOS
        mask[b, :n] = 1
    ids[2, 4] = PAD
    types = torch.zeros(3, 12, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def make_model(tok):
    torch.manual_seed(17)
    cfg = RobertaConfig(vocab_size=len(tok) + 3, **TINY_ROBERTA)
    cfg._attn_implementation = "eager"
    model = RobertaModel(cfg)
    model.eval()
    mf.perturb_bert(model, 1017)
    # The padding rows of the word and position tables are zero after init; give them values, so
    # a wrong position row cannot pass unnoticed (the model reads them for every pad token).
    g = torch.Generator().manual_seed(2017)
    with torch.no_grad():
        for table in (model.embeddings.word_embeddings, model.embeddings.position_embeddings):
            table.weight[PAD].copy_(0.02 * torch.randn(table.weight.shape[1], generator=g))
    model.save_pretrained(str(D), safe_serialization=True)
    return model


def check_xlm_roberta(inputs, expected):
    """XLMRobertaModel is RobertaModel's code: the same weights give the same bits."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    cfg = json.loads((D / "config.json").read_text(encoding="utf-8"))
    assert cfg["model_type"] == "roberta"
    xcfg = XLMRobertaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")})
    assert xcfg.model_type == "xlm-roberta"
    xcfg._attn_implementation = "eager"
    x = XLMRobertaModel(xcfg)
    info = x.load_state_dict(load_file(str(D / "model.safetensors")), strict=False)
    assert not info.missing_keys and not info.unexpected_keys, info
    x.eval()
    mf.assert_same(D / "expected.safetensors", mf.run_bert(x, inputs))
    print("[tiny_roberta] XLMRobertaModel on the same weights: bit-identical outputs")
    return expected


# ---------------------------------------------------------------------------------------------
# adapters


def adapters_model():
    import adapters

    model = load_roberta()
    adapters.init(model)
    model.eval()
    return model


def with_adapters(names):
    model = adapters_model()
    for n in names:
        assert model.load_adapter(str(AD / n), use_safetensors=True) == n
    model.eval()
    return model


def out_only(res):
    return {k: v for k, v in res.items() if k in ("last_hidden_state", "pooler_output")}


def make_adapters(inputs):
    from adapters import AdapterConfig, Parallel

    model = adapters_model()
    for name, cfg in ADAPTERS:
        mf.add_blown_up_adapter(model, name, AdapterConfig.load(cfg))
    model.eval()
    files = {}
    for name, _ in ADAPTERS:
        saved, note = mf.save_adapter_dir(model, name, AD / name)
        assert note is None and saved == ["adapter.safetensors", "adapter_config.json"], (name, saved, note)
        cfg = json.loads((AD / name / "adapter_config.json").read_text(encoding="utf-8"))
        assert (cfg["model_class"], cfg["model_type"]) == ("RobertaModel", "roberta"), cfg
        keys = load_file(str(AD / name / "adapter.safetensors")).keys()
        assert not any(k.startswith("roberta.") for k in keys)
        model.set_active_adapters(name)
        files[f"expected_{name}.safetensors"] = out_only(mf.run_bert(model, inputs))
    for names in PARALLEL:
        model.set_active_adapters(Parallel(*names))
        exp = out_only(mf.run_bert(model, inputs))
        assert exp["last_hidden_state"].shape[0] == 2 * inputs["input_ids"].shape[0]
        files[f"expected_parallel_{'__'.join(names)}.safetensors"] = exp
    for f, t in files.items():
        mf.save_tensors(D / f, t)
    # self-check: a fresh model with every adapter loaded from disk
    fresh = with_adapters([n for n, _ in ADAPTERS])
    for name, _ in ADAPTERS:
        fresh.set_active_adapters(name)
        mf.assert_same(D / f"expected_{name}.safetensors", out_only(mf.run_bert(fresh, inputs)))
    for names in PARALLEL:
        fresh.set_active_adapters(Parallel(*names))
        mf.assert_same(D / f"expected_parallel_{'__'.join(names)}.safetensors", out_only(mf.run_bert(fresh, inputs)))
    print(f"[tiny_roberta] {len(ADAPTERS)} adapters, {len(PARALLEL)} Parallel setups; reload check OK")
    return files


def flex_model():
    from adapters import RobertaAdapterModel

    model, info = RobertaAdapterModel.from_pretrained(str(D), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    model.eval()
    return model


def make_flex(inputs):
    """pfeiffer_inv with a classification head, saved from RobertaAdapterModel: keys under
    `roberta.`, a head_config.json of RobertaAdapterModel; and the head's logits."""
    name = "pfeiffer_inv"
    model = flex_model()
    assert model.load_adapter(str(AD / name), use_safetensors=True) == name
    mf.add_blown_up_head(model, name)
    model.eval()
    model.set_active_adapters(name)
    d = AD / "flex_pfeiffer_inv"
    if d.exists():
        shutil.rmtree(d)
    model.save_adapter(str(d), name, with_head=True, use_safetensors=True)
    keys = load_file(str(d / "adapter.safetensors")).keys()
    assert keys and all(k.startswith("roberta.") for k in keys), sorted(keys)
    head_cfg = json.loads((d / "head_config.json").read_text(encoding="utf-8"))
    assert (head_cfg["model_class"], head_cfg["model_type"]) == ("RobertaAdapterModel", "roberta"), head_cfg
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    cls = out.hidden_states[-1][:, 0]
    logits = out.logits
    torch.testing.assert_close(logits, mf.reference_logits(model, name, cls), rtol=0, atol=1e-5)
    res = mf.save_tensors(D / "expected_flex_head.safetensors", {"logits": logits, "cls_output": cls})
    fresh = flex_model()
    assert fresh.load_adapter(str(d), use_safetensors=True) == name
    fresh.eval()
    fresh.set_active_adapters(name)
    with torch.no_grad():
        again = fresh(**inputs, output_hidden_states=True, return_dict=True)
    mf.assert_same(D / "expected_flex_head.safetensors", {"logits": again.logits, "cls_output": again.hidden_states[-1][:, 0]})
    print(f"[tiny_roberta] flex head: {sorted(os.listdir(d))}; reload check OK")
    return res


def adapter_keys(names):
    out = set()
    for n in names:
        out |= set(load_file(str(AD / n / "adapter.safetensors")).keys())
    return out


def run_probe(case, setup, train, inputs):
    model = with_adapters(dict.fromkeys(setup))
    mf.enter_training(model, train, setup)
    params = mf.trainable_params(model)
    assert set(params) == adapter_keys(train), (case, sorted(set(params) ^ adapter_keys(train)))
    out = model(**inputs, return_dict=True).last_hidden_state
    W = mf.probe_W("roberta_" + case, out.shape)
    loss = (out * W).sum()
    loss.backward()
    res = {"W": W, "loss": loss.detach().reshape(1)}
    res.update(mf.grads_of(params))
    return res


def make_gradients(inputs):
    written = {}
    for case, setup, train in PROBES:
        written[f"grad_{case}.safetensors"] = mf.save_tensors(D / f"grad_{case}.safetensors", run_probe(case, setup, train, inputs))
    for case, setup, train in PROBES:
        mf.assert_same(D / f"grad_{case}.safetensors", run_probe(case, setup, train, inputs))
    print(f"[tiny_roberta] {len(PROBES)} gradient cases; recomputed bit-identically")
    return written


# ---------------------------------------------------------------------------------------------


def write_readme(tok, inputs, text_inputs, files):
    import adapters
    import transformers

    cfg = json.loads((D / "config.json").read_text(encoding="utf-8"))
    out = [
        "# Tiny RoBERTa parity fixtures",
        "",
        f"Generated by `tools/make_roberta_fixtures.py` (adapters {adapters.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU, float32, eval mode, eager attention).",
        "Do not edit by hand; re-run the script (it rewrites only this folder).",
        "",
        f"Model: random `RobertaConfig` (vocab {cfg['vocab_size']}, H {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, intermediate "
        f"{cfg['intermediate_size']}, max_position_embeddings {cfg['max_position_embeddings']}, "
        f"type_vocab_size {cfg['type_vocab_size']}, pad_token_id {cfg['pad_token_id']}, layer_norm_eps "
        f"{cfg['layer_norm_eps']}), LayerNorms and biases perturbed, the pad rows of the word and position "
        "tables non-zero; `RobertaModel.save_pretrained` (keys without the `roberta.` prefix, pooler included).",
        "",
        "Tokenizer: byte-level BPE trained by the script on `tests/fixtures/train/reviews.csv` "
        f"(vocab {len(tok)}: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` 4), saved by "
        "`RobertaTokenizerFast.save_pretrained` (`padding` null, as in roberta-base's file).",
        "",
        "Positions: `create_position_ids_from_input_ids(input_ids, padding_idx=1)`: pad ids read row 1, "
        "every other token row 1 + its count of non-pad tokens so far. Inputs "
        f"{list(inputs['input_ids'].shape)}: real padding (id 1, mask 0) and one pad id inside sequence 2 "
        "(position 4, mask 1), which moves the positions after it. Token types are zeros.",
        "",
        "| file | what | tensors |",
        "|---|---|---|",
    ]
    for f, what in [
        ("inputs.safetensors", "input_ids, attention_mask, token_type_ids"),
        ("expected.safetensors", "RobertaModel on the inputs (also checked bit-identical for XLMRobertaModel)"),
        ("expected_defaults.safetensors", "on input_ids alone (mask ones, types zeros)"),
        ("expected_text.safetensors", "HF fast tokenizer on `sentences.txt` (padding to the longest), and outputs"),
    ] + [(f, "adapters (`adapters/<name>`, blown up as in tests/fixtures/adapters)") for f in sorted(files) if f.startswith("expected_")] + [
        ("expected_flex_head.safetensors", "`adapters/flex_pfeiffer_inv` (RobertaAdapterModel, `roberta.` keys, "
         "classification head of 2 layers, 3 labels): logits and `cls_output` (last_hidden_state[:, 0])"),
    ] + [(f"grad_{c}.safetensors", f"probe loss Σ last_hidden_state ⊙ W, S = {'Parallel' if len(s) > 1 else ''}"
          f"({', '.join(s)}), T = {', '.join(t)} (as tests/fixtures/training, section 1)") for c, s, t in PROBES]:
        out.append(f"| `{f}` | {what} | {mf.describe(load_file(str(D / f)))} |")
    out += ["", "Sentences and HF's ids:", ""]
    for s, ids in zip(SENTENCES, text_inputs["input_ids"]):
        out.append(f"- `{s}` -> {ids.tolist()}")
    out.append("")
    (D / "README.md").write_text("\n".join(out), encoding="utf-8")


def main():
    os.chdir(mf.REPO)
    mf.setup_determinism()
    if D.exists():
        shutil.rmtree(D)
    D.mkdir(parents=True)

    tok = make_tokenizer()
    model = make_model(tok)
    inputs = make_inputs(len(tok))
    mf.save_tensors(D / "inputs.safetensors", inputs)
    expected = mf.save_tensors(D / "expected.safetensors", mf.run_bert(model, inputs))
    mf.save_tensors(D / "expected_defaults.safetensors",
                    mf.run_bert(model, {"input_ids": inputs["input_ids"]}, hidden_states=False))
    (D / "sentences.txt").write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    text_inputs = encode(tok, SENTENCES)
    assert (text_inputs["input_ids"][text_inputs["attention_mask"] == 0] == PAD).all()
    assert (text_inputs["attention_mask"] == 0).any(), "the sentences must need padding"
    mf.save_tensors(D / "expected_text.safetensors", {**text_inputs, **out_only(mf.run_bert(model, text_inputs))})

    reloaded = load_roberta()
    mf.assert_same(D / "expected.safetensors", mf.run_bert(reloaded, inputs))
    check_xlm_roberta(inputs, expected)

    AD.mkdir()
    files = make_adapters(inputs)
    make_flex(inputs)
    make_gradients(inputs)
    write_readme(tok, inputs, text_inputs, files)
    total = sum(f.stat().st_size for f in D.rglob("*") if f.is_file())
    print(f"[tiny_roberta] {D}: {total / 1024:.0f} KiB")
    for s, ids in zip(SENTENCES, text_inputs["input_ids"]):
        print("   ", repr(s), "->", tok.convert_ids_to_tokens(ids.tolist()))


if __name__ == "__main__":
    main()
