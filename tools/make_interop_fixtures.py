#!/usr/bin/env python3
"""Generate the adapter-file interop fixtures in tests/fixtures/interop/ (issue 5).

    /root/venv-fixtures/bin/python tools/make_interop_fixtures.py

Needs the environment of tools/requirements.txt (adapters 1.3.0, transformers 4.57.6, torch) and
the tiny_bert / adapters fixtures that tools/make_fixtures.py writes. CPU, float32, eval mode,
eager attention, fixed seeds; re-running gives the same tensors. Every adapter folder written
here is loaded back by the library and must reproduce the stored outputs exactly.

What it writes (see tests/fixtures/interop/README.md, also written here):

  flex_bin/            BertAdapterModel: adapter "flex" (houlsby+inv) + classification head
                       "flex", saved with the library's defaults: pytorch_adapter.bin (keys with
                       `bert.`), pytorch_model_head.bin, head_config.json
  expected_flex.safetensors          last_hidden_state, pooler_output, logits
  f16_bin/, bf16_bin/  adapters whose weights are float16 / bfloat16 (HalfStorage /
                       BFloat16Storage in the .bin)
  expected_f16.safetensors, expected_bf16.safetensors   float32 outputs with those weights
  legacy_bin/          the `pfeiffer` fixture adapter as adapter-transformers 2.x/3.x saved
                       adapters: `layer_text_task_adapters` keys, a `state_dict()` OrderedDict
                       with `_metadata` (pickled with BUILD), no "version" in the config;
                       gives ../adapters/expected_pfeiffer.safetensors
  views.bin            {"a", "b", "c"}: three views into one storage at offsets 0, 6 and 10
  views_expected.safetensors          the same three tensors
  transposed.bin       {"w"}: a non-contiguous (transposed) tensor, which our reader refuses
"""

import collections
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
FIX = Path("tests/fixtures")  # relative to REPO (main() chdirs there): saved model_name stays relative
OUT = FIX / "interop"
BLOWUP = 25.0


def seed_of(name, salt):
    return (zlib.crc32(name.encode("utf-8")) + 7919 * salt) % (2**31)


def inputs():
    return {k: v for k, v in load_file(str(FIX / "tiny_bert" / "inputs.safetensors")).items()}


def blow_up(model, name):
    """Linear weights x25, biases 0.5*randn (as tools/make_fixtures.py does)."""
    g = torch.Generator().manual_seed(seed_of(name, 2))
    tag = f"adapters.{name}."
    with torch.no_grad():
        for mname, module in model.named_modules():
            if tag in mname + "." and isinstance(module, torch.nn.Linear):
                module.weight.mul_(BLOWUP)
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))


def bert_with_adapters():
    import adapters
    from transformers import BertModel

    model = BertModel.from_pretrained(str(FIX / "tiny_bert"), attn_implementation="eager")
    adapters.init(model)
    model.eval()
    return model


def outputs(model, inp):
    with torch.no_grad():
        out = model(**inp, return_dict=True)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def save(path, tensors):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


def check_same(a, b, what):
    assert set(a) == set(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k] - b[k]).abs().max().item()}"


def make_flex(inp):
    from adapters import BertAdapterModel

    name = "flex"
    model = BertAdapterModel.from_pretrained(str(FIX / "tiny_bert"), attn_implementation="eager")
    torch.manual_seed(seed_of(name, 1))
    model.add_adapter(name, config="houlsby+inv")
    blow_up(model, name)
    torch.manual_seed(seed_of(name, 4))
    model.add_classification_head(name, num_labels=3, layers=2, activation_function="tanh")
    g = torch.Generator().manual_seed(seed_of(name, 5))
    with torch.no_grad():
        for module in model.heads[name].children():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5.0)
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
    model.set_active_adapters(name)
    model.eval()
    d = OUT / "flex_bin"
    model.save_adapter(str(d), name)  # defaults: .bin, with_head=True
    assert sorted(p.name for p in d.iterdir()) == [
        "adapter_config.json", "head_config.json", "pytorch_adapter.bin", "pytorch_model_head.bin"], list(d.iterdir())

    def run(m):
        with torch.no_grad():
            out = m(**inp, output_hidden_states=True, return_dict=True)
        # BertAdapterModel's output has no pooler_output; the base model's pooler gives it.
        with torch.no_grad():
            pooled = m.bert.pooler(out.hidden_states[-1])
        return {"last_hidden_state": out.hidden_states[-1], "pooler_output": pooled, "logits": out.logits}

    expected = run(model)
    save(OUT / "expected_flex.safetensors", expected)
    fresh = BertAdapterModel.from_pretrained(str(FIX / "tiny_bert"), attn_implementation="eager")
    assert fresh.load_adapter(str(d)) == name
    fresh.set_active_adapters(name)
    fresh.eval()
    check_same(run(fresh), expected, "flex_bin reload")


def make_half(inp, name, config, dtype, tag):
    model = bert_with_adapters()
    torch.manual_seed(seed_of(name, 1))
    model.add_adapter(name, config=config)
    blow_up(model, name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"adapters.{name}." in pname:
                p.copy_(p.to(dtype).float())  # representable in `dtype`, so f32 math is exact
    model.set_active_adapters(name)
    expected = outputs(model, inp)
    save(OUT / f"expected_{tag}.safetensors", expected)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"adapters.{name}." in pname:
                p.data = p.data.to(dtype)
    d = OUT / f"{tag}_bin"
    model.save_adapter(str(d), name)
    sd = torch.load(str(d / "pytorch_adapter.bin"), weights_only=True)
    assert all(v.dtype == dtype for v in sd.values()), {k: v.dtype for k, v in sd.items()}
    fresh = bert_with_adapters()
    fresh.load_adapter(str(d))
    fresh.set_active_adapters(name)
    with torch.no_grad():
        for pname, p in fresh.named_parameters():
            if f"adapters.{name}." in pname:
                p.data = p.data.float()
    check_same(outputs(fresh, inp), expected, f"{tag}_bin reload")


def make_legacy(inp):
    src = FIX / "adapters" / "pfeiffer"
    d = OUT / "legacy_bin"
    d.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    del cfg["version"]
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd = collections.OrderedDict(
        (k.replace(".adapters.pfeiffer.", ".layer_text_task_adapters.pfeiffer."), v)
        for k, v in load_file(str(src / "adapter.safetensors")).items())
    sd._metadata = collections.OrderedDict((k.rsplit(".", 1)[0], {"version": 1}) for k in sd)
    torch.save(sd, str(d / "pytorch_adapter.bin"))
    model = bert_with_adapters()
    assert model.load_adapter(str(d)) == "pfeiffer"
    model.set_active_adapters("pfeiffer")
    expected = load_file(str(FIX / "adapters" / "expected_pfeiffer.safetensors"))
    got = outputs(model, inp)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def make_views():
    base = torch.arange(16, dtype=torch.float32) * 0.5 - 3.0
    views = {"a": base[:6].view(2, 3), "b": base[6:10], "c": base[10:].view(3, 2)}
    torch.save(views, str(OUT / "views.bin"))
    save(OUT / "views_expected.safetensors", views)
    back = torch.load(str(OUT / "views.bin"), weights_only=True)
    check_same(back, {k: v.clone() for k, v in views.items()}, "views.bin")
    torch.save({"w": torch.arange(12, dtype=torch.float32).view(3, 4).t()}, str(OUT / "transposed.bin"))


README = """# Adapter file interop fixtures

Generated by `tools/make_interop_fixtures.py` (adapters 1.3.0, transformers 4.57.6, torch, CPU,
float32, eval mode, eager attention); the script's docstring lists what each file is. Inputs
are `../tiny_bert/inputs.safetensors`, the base model `../tiny_bert/`.

| folder / file | what it exercises | expected |
|---|---|---|
| `flex_bin/` | library defaults from a `BertAdapterModel`: `pytorch_adapter.bin` with `bert.` keys, houlsby+inv (NICE), `head_config.json` + `pytorch_model_head.bin` (classification head, 2 layers, 3 labels) | `expected_flex.safetensors`: `last_hidden_state`, `pooler_output`, `logits` |
| `f16_bin/` | houlsby adapter `fp16` with float16 weights (`torch.HalfStorage`) | `expected_f16.safetensors` (float32 model with the same, exactly representable, weights) |
| `bf16_bin/` | pfeiffer adapter `brain` with bfloat16 weights (`torch.BFloat16Storage`) | `expected_bf16.safetensors` |
| `legacy_bin/` | adapter-transformers style: `layer_text_task_adapters` keys, an `OrderedDict` state dict with `_metadata` (BUILD in the pickle), config without `version` | `../adapters/expected_pfeiffer.safetensors` |
| `views.bin` | three views (offsets 0, 6, 10) of one storage | `views_expected.safetensors` |
| `transposed.bin` | a non-contiguous tensor | refused |
"""


def main():
    os.chdir(REPO)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    inp = inputs()
    make_flex(inp)
    make_half(inp, "fp16", "houlsby", torch.float16, "f16")
    make_half(inp, "brain", "pfeiffer", torch.bfloat16, "bf16")
    make_legacy(inp)
    make_views()
    (OUT / "README.md").write_text(README)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
