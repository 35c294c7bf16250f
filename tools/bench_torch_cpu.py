#!/usr/bin/env python3
"""PyTorch eager + `adapters` 1.3.0 on the CPU: the steps of bert-adapters' criterion group
`cpu_train_step_minilm_parallel_16x64` (benches/forward.rs), timed the same way, and the ratio
table against our latest criterion results when they exist.

    /root/venv-fixtures/bin/python tools/bench_torch_cpu.py            # PyTorch only
    cargo bench --locked --bench forward -- cpu_train_step_minilm_parallel_16x64
    /root/venv-fixtures/bin/python tools/bench_torch_cpu.py --ours     # + ratio table

(the venv is tools/requirements.txt's; see tools/make_fixtures.py). The setup matches the bench:
MiniLM (models/all-MiniLM-L6-v2), `Parallel(scorenn, tasknn)` with two pfeiffer adapters and
3-class heads, `train_adapter("tasknn")` then the Parallel setup active again, B = 16 identical
sentences of 64 tokens (no padding), torch.set_num_threads = the machine's cores (2 here).

Steps (each the median of --steps runs after --warmup runs):
  forward_only                 eval mode, no_grad, the encoder under Parallel
  forward_train_and_backward   train mode (dropout), encoder forward, sum(last_hidden_state) backward
  full_step                    train mode: encoder + heads, tasknn's objective CE(t, y) + λ·E with
                               E = −mean⟨softmax(t), s⟩ (s detached), backward, clip_grad_norm_(1.0),
                               AdamW over tasknn's adapter and head, zero_grad
Ours: `full_step` is the step `train` runs (`BertModel::train_step`).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUR_GROUP = "cpu_train_step_minilm_parallel_16x64"
PAIRS = [("forward_only", "forward_only"), ("forward_train_and_backward", "forward_train_and_backward"), ("full_step", "full_step")]


def median_ms(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def build(model_dir, batch, seq_len):
    import adapters  # noqa: F401 (registers the adapter model classes)
    from adapters import BertAdapterModel
    from adapters.composition import Parallel
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = BertAdapterModel.from_pretrained(model_dir)
    for name in ["scorenn", "tasknn"]:
        model.add_adapter(name, config="pfeiffer")
        model.add_classification_head(name, num_labels=3)
    model.train_adapter("tasknn")
    model.active_adapters = Parallel("scorenn", "tasknn")
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "adapters train a few parameters on a frozen encoder " * 8
    enc = tok([text] * batch, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    labels = torch.arange(batch) % 3
    return model, enc, labels


def our_results():
    root = REPO / "target" / "criterion" / OUR_GROUP
    out = {}
    for _, ours in PAIRS:
        f = root / ours / "new" / "estimates.json"
        if f.is_file():
            est = json.loads(f.read_text())
            out[ours] = est["median"]["point_estimate"] / 1e6  # ns -> ms
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.1)
    ap.add_argument("--ours", action="store_true", help="print the ratio table against target/criterion")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, enc, labels = build(args.model, args.batch, args.seq_len)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    trained = [p for n, p in model.named_parameters() if p.requires_grad and ("tasknn" in n)]
    opt = torch.optim.AdamW(trained, lr=1e-5)

    def forward_only():
        model.eval()
        with torch.no_grad():
            model.bert(input_ids=ids, attention_mask=mask)

    def forward_train_and_backward():
        model.train()
        out = model.bert(input_ids=ids, attention_mask=mask)
        out.last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)

    def full_step():
        model.train()
        outs = model(input_ids=ids, attention_mask=mask)
        s, t = outs[0].logits, outs[1].logits  # Parallel heads, in setup order
        ce = torch.nn.functional.cross_entropy(t, labels)
        energy = -(torch.softmax(t, dim=-1) * s.detach()).sum(-1).mean()
        loss = ce + args.lam * energy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    fns = {"forward_only": forward_only, "forward_train_and_backward": forward_train_and_backward, "full_step": full_step}
    torch_ms = {}
    for name, fn in fns.items():
        med, best = median_ms(fn, args.warmup, args.steps)
        torch_ms[name] = med
        print(f"torch {name:<28} median {med:8.1f} ms   min {best:8.1f} ms")

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu}, {args.threads} threads, torch {torch.__version__}, B={args.batch} T={args.seq_len}")
    if args.ours:
        ours = our_results()
        print("\n| step | bert-adapters (ms) | PyTorch eager + adapters (ms) | ratio (PyTorch / ours) |")
        print("|---|---|---|---|")
        for theirs, mine in PAIRS:
            if mine in ours:
                print(f"| {theirs} | {ours[mine]:.0f} | {torch_ms[theirs]:.0f} | **{torch_ms[theirs] / ours[mine]:.2f}** |")
            else:
                print(f"| {theirs} | (no criterion result for `{OUR_GROUP}/{mine}`) | {torch_ms[theirs]:.0f} | |")


if __name__ == "__main__":
    main()
