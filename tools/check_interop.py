#!/usr/bin/env python3
"""Check that adapters saved by the Rust crate load in the Python library and compute the same.

    BERT_ADAPTERS_INTEROP_OUT=/tmp/interop cargo test --test adapter_files exports_adapters
    /root/venv-fixtures/bin/python tools/check_interop.py /tmp/interop

The Rust test writes adapter folders (adapter_config.json + adapter.safetensors, and for one case
head_config.json + model_head.safetensors), our outputs for each case, and manifest.json. For
every case this script loads the folders with `model.load_adapter(dir, use_safetensors=True)`
(a `BertAdapterModel` when the case has a head, else `adapters.init(BertModel)`), checks that
every tensor in the file went into the model and every adapter parameter came from the file,
activates the adapter (or `Parallel(...)`), runs the tiny BERT on its inputs and compares with
our outputs: max|ours - torch| <= 1e-5 * (1 + max|torch|). Exit status 1 on any failure.

Needs the environment of tools/requirements.txt. CI does not run it (no torch there).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def build(model_dir, with_heads):
    import adapters
    from adapters import BertAdapterModel
    from transformers import BertModel

    if with_heads:
        model = BertAdapterModel.from_pretrained(str(model_dir), attn_implementation="eager")
    else:
        model = BertModel.from_pretrained(str(model_dir), attn_implementation="eager")
        adapters.init(model)
    model.eval()
    return model


def check_weights(model, d, name):
    """Every file tensor is in the model with the same values, and the model has no other ones."""
    sd = {k.removeprefix("bert."): v for k, v in model.state_dict().items()}
    mine = {k for k in sd if f"adapters.{name}." in k}
    saved = load_file(str(d / "adapter.safetensors"))
    problems = []
    if set(saved) != mine:
        problems.append(f"keys differ: only in file {sorted(set(saved) - mine)}, only in model {sorted(mine - set(saved))}")
    for k, v in saved.items():
        if k in sd and not torch.equal(sd[k], v):
            problems.append(f"{k}: loaded values differ")
    if (d / "model_head.safetensors").exists():
        heads = load_file(str(d / "model_head.safetensors"))
        full = model.state_dict()
        for k, v in heads.items():
            if k not in full or not torch.equal(full[k], v):
                problems.append(f"head tensor {k} not loaded")
    return problems


def compare(label, ours, torch_out):
    ref = torch_out.detach().float()
    if tuple(ours.shape) != tuple(ref.shape):
        return f"{label}: shape {tuple(ours.shape)} vs torch {tuple(ref.shape)}", None
    diff = (ours - ref).abs().max().item()
    bound = TOL * (1.0 + ref.abs().max().item())
    status = "ok" if diff <= bound else "FAIL"
    return f"{label}: max|diff| {diff:.3e} (bound {bound:.3e}) {status}", diff <= bound


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    manifest = json.loads((root / "manifest.json").read_text())
    from adapters import Parallel

    torch.set_num_threads(2)
    inputs = load_file(str(REPO / manifest["inputs"]))
    failures = 0
    for case in manifest["cases"]:
        model = build(REPO / manifest["model"], case["head"])
        names = []
        for a in case["adapters"]:
            name = model.load_adapter(str(root / a), use_safetensors=True)
            names.append(name)
            problems = check_weights(model, root / a, name)
            for p in problems:
                print(f"[{case['case']}] {a}: {p}")
            failures += len(problems)
        model.set_active_adapters(Parallel(*names) if case["parallel"] else names[0])
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, return_dict=True)
        last = out.hidden_states[-1] if case["head"] else out.last_hidden_state
        got = {"last_hidden_state": last}
        if case["head"]:
            with torch.no_grad():
                got["pooler_output"] = model.bert.pooler(last)
            got["logits"] = out.logits
        else:
            got["pooler_output"] = out.pooler_output
        ours = load_file(str(root / case["outputs"]))
        for key, ref in got.items():
            line, ok = compare(f"[{case['case']}] {key}", ours[key], ref)
            print(line)
            failures += 0 if ok else 1
    print("all cases match" if failures == 0 else f"{failures} failure(s)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
