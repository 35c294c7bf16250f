#!/usr/bin/env python3
"""PyTorch + `adapters` 1.3.0: the training step of bert-adapters' `train_step/*` criterion groups
(benches/cuda.rs), in eager mode (SDPA attention) and under torch.compile, timed with CUDA events.

    python3 tools/bench_torch.py                                  # every shape, eager + compile, bf16 + fp32
    python3 tools/bench_torch.py --shapes bert_base:32x128 --modes eager --precisions bf16
    python3 tools/bench_torch.py --device cpu --shapes tiny:2x16 --steps 3 --warmup 1   # a dry run
    python3 tools/bench_torch.py --ours target/criterion          # + our criterion results and the ratios

The step is the one `train` runs (src/bin/bert-adapters/train.rs), as benches/cuda.rs times it:
  - a BERT of random weights (transformers' init; no hub access): `bert_base` (12 layers, H 768),
    `minilm` (all-MiniLM-L6-v2's shape: 6 layers, H 384, 12 heads, I 1536) or `tiny` (2 layers,
    H 64, for dry runs); attention through SDPA (`attn_implementation="sdpa"`);
  - two pfeiffer adapters `scorenn`, `tasknn` with 3-class heads (2 layers, tanh), active as
    Parallel(scorenn, tasknn), dropout on (model.train(): BERT's 0.1, the heads');
  - B sequences padded to T, row i holding T − ⌊0.4·T·i/B⌋ real tokens (about 20 % padding; the
    same rule as the Rust bench), random ids, labels i % 3;
  - tasknn and scorenn trained alternately, 10 steps each (`train --alternate 10`), each with its
    own AdamW (lr 1e-3, torch defaults otherwise) over its adapter and head, gradients clipped
    to norm 1, and its own objective (src/train/loss.rs, weights from objective.rs):
      tasknn:  CE(t, y) − λ·mean⟨softmax(t), s⟩             λ = 0.1, s detached
      scorenn: mean max(0, Δ − s_y + ⟨p̂, s⟩) + α·CE(s, y)   Δ = 1, α = 0.1, p̂ = softmax(t) detached
    with s, t the logits of scorenn's and tasknn's heads from the one Parallel forward.
  - bf16: the forward under torch.autocast(bfloat16) (the loss in f32); fp32: no autocast and
    TF32 off (the cuBLAS setting our f32 products use); tf32: TF32 on for matrix products.

Timing: each step between two CUDA events (host clocks with --device cpu); the median of --steps
steps (default 50) after a pre-warm of 2 steps per adapter (where torch.compile compiles) and
--warmup more (default 10). Throughput counts B·T positions, padding included, as the Rust bench.

Output: one JSON object per line on stdout (also appended to --json FILE): `{"kind": "env", ...}`
once, `{"kind": "torch_step", ...}` per (shape, mode, precision) with median/min/p10/p90 ms,
tokens/s, peak memory, torch.compile's graph-break count and compile time, or "error" when that
configuration failed; with --ours, `{"kind": "criterion", ...}` per criterion benchmark found and
`{"kind": "ratio", ...}` per (our step, torch configuration) with ours/torch (below 1: we are
faster; the targets are S1 ≤ 0.40 against eager bf16 and S2 ≤ 0.75 against compile in
docs/PERFORMANCE.md). A readable table goes to stderr.

--profile MODEL:BxT: after timing that shape's eager configurations, 3 more steps of each under
torch.profiler (CPU and, on a GPU, CUDA activities), and a table of the 25 operators with the
most device time (self time, summed over the 3 steps) on stderr and as one
`{"kind": "torch_profile", ...}` line: PyTorch's side of our step profile (CUDA_BENCH_PROFILE=1,
benches/cuda.rs), from the same machine.
Exit status: 0 when every configuration ran; 1 when some failed (their lines say why); 2 when torch,
transformers, adapters or (with --device cuda) a CUDA device is missing.
Needs: torch, transformers 4.57.x, adapters 1.3.0 (tools/requirements.txt pins them).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Model shapes (benches/cuda.rs's Dims).
MODELS = {
    "bert_base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512),
    "tiny": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64),
}
DEFAULT_SHAPES = "bert_base:32x128,bert_base:8x512,minilm:16x64"
SCORENN, TASKNN = "scorenn", "tasknn"
ALTERNATE = 10
LAMBDA, MARGIN, SCORE_CE = 0.1, 1.0, 0.1
MAX_GRAD_NORM = 1.0
PREWARM_PER_ADAPTER = 2


def fail_missing(what, err):
    print(f"error: bench_torch.py needs {what}: {err}", file=sys.stderr)
    print("       install the pinned versions of tools/requirements.txt (torch, transformers 4.57.6, adapters 1.3.0)", file=sys.stderr)
    sys.exit(2)


def parse_shapes(text):
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            model, bt = item.split(":")
            b, t = (int(x) for x in bt.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --shapes: `{item}` is not MODEL:BxT (e.g. bert_base:32x128)")
        if model not in MODELS:
            raise SystemExit(f"error: --shapes: unknown model `{model}` (known: {', '.join(MODELS)})")
        if b < 1 or t < 1 or t > MODELS[model]["max_position_embeddings"]:
            raise SystemExit(f"error: --shapes: `{item}`: B and T must be positive and T at most {MODELS[model]['max_position_embeddings']}")
        out.append((model, b, t))
    if not out:
        raise SystemExit("error: --shapes is empty")
    return out


def lengths(batch, seq):
    """Real tokens per row: row 0 full, about 20 % padding in all (benches/cuda.rs's `lengths`)."""
    return [max(1, seq - (2 * seq * i) // (5 * batch)) for i in range(batch)]


def trained_at(step):
    return TASKNN if (step // ALTERNATE) % 2 == 0 else SCORENN


def emit(obj, json_file):
    line = json.dumps(obj, sort_keys=True)
    print(line, flush=True)
    if json_file:
        with open(json_file, "a") as f:
            f.write(line + "\n")


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Setup:
    """One model with its adapters, heads, optimizers and batch on `device`."""

    def __init__(self, torch, model_name, batch, seq, device, seed=0):
        from transformers import BertConfig
        from adapters import BertAdapterModel
        from adapters.composition import Parallel

        self.torch = torch
        dims = MODELS[model_name]
        cfg = BertConfig(
            **dims,
            hidden_act="gelu",
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            pad_token_id=0,
        )
        torch.manual_seed(seed)
        model = BertAdapterModel._from_config(cfg, attn_implementation="sdpa")
        self.attn_implementation = getattr(model.config, "_attn_implementation", "?")
        for name in (SCORENN, TASKNN):
            model.add_adapter(name, config="pfeiffer")
            model.add_classification_head(name, num_labels=3)
        model.to(device)
        self.model = model
        self.parallel = Parallel(SCORENN, TASKNN)
        self.params = {}
        self.optimizers = {}
        for name in (SCORENN, TASKNN):
            ps = [p for n, p in model.named_parameters() if f".{name}." in f".{n}."]
            if not ps:
                raise RuntimeError(f"no parameters found for adapter {name}")
            self.params[name] = ps
            self.optimizers[name] = torch.optim.AdamW(ps, lr=1e-3)
        gen = torch.Generator().manual_seed(99)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for i, n in enumerate(lengths(batch, seq)):
            ids[i, :n] = torch.randint(1, dims["vocab_size"], (n,), generator=gen)
            mask[i, :n] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.labels = (torch.arange(batch) % 3).to(device)
        self.trained = None

    def select(self, name):
        """Make `name` the trained adapter (as `train` does when the alternation switches);
        `train_adapter` also sets the active setup to it, so Parallel is set again."""
        if self.trained != name:
            self.model.train_adapter(name)
            self.model.active_adapters = self.parallel
            self.model.train()
            self.trained = name

    def loss(self, s, t, name):
        F = self.torch.nn.functional
        s, t, y = s.float(), t.float(), self.labels
        if name == TASKNN:
            p = self.torch.softmax(t, dim=-1)
            return F.cross_entropy(t, y) - LAMBDA * (p * s.detach()).sum(-1).mean()
        p_hat = self.torch.softmax(t.detach(), dim=-1)
        hinge = (MARGIN - s.gather(1, y[:, None])[:, 0] + (p_hat * s).sum(-1)).clamp_min(0)
        return hinge.mean() + SCORE_CE * F.cross_entropy(s, y)


def run_config(torch, args, model_name, batch, seq, mode, precision, device):
    """Times one configuration; returns the torch_step record."""
    rec = dict(kind="torch_step", shape=f"{model_name}_{batch}x{seq}", model=model_name, batch=batch, seq=seq, mode=mode, precision=precision, device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    setup = Setup(torch, model_name, batch, seq, device)
    rec["attn_implementation"] = setup.attn_implementation
    forward = setup.model
    if mode == "compile":
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        forward = torch.compile(setup.model, mode=None if args.compile_mode == "default" else args.compile_mode)
        rec["compile_mode"] = args.compile_mode
    autocast = precision == "bf16"

    def step(i):
        name = trained_at(i)
        setup.select(name)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            outs = forward(input_ids=setup.ids, attention_mask=setup.mask)
        s, t = outs[0].logits, outs[1].logits  # Parallel heads, in setup order
        loss = setup.loss(s, t, name)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.params[name], MAX_GRAD_NORM)
        opt = setup.optimizers[name]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # Pre-warm: both adapters (torch.compile compiles a graph per trainable set here).
    t0 = time.perf_counter()
    i = 0
    for name in (TASKNN, SCORENN):
        while trained_at(i) != name:
            i += 1
        for _ in range(PREWARM_PER_ADAPTER):
            step(i)
            i += 1
    sync()
    rec["prewarm_s"] = round(time.perf_counter() - t0, 3)
    i = 0
    for _ in range(args.warmup):
        step(i)
        i += 1
    sync()
    times = []
    last = None
    if device == "cuda":
        events = []
        for _ in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            last = step(i)
            b.record()
            events.append((a, b))
            i += 1
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
        rec["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        for _ in range(args.steps):
            t1 = time.perf_counter()
            last = step(i)
            times.append((time.perf_counter() - t1) * 1e3)
            i += 1
    times.sort()
    med = statistics.median(times)
    rec.update(
        steps=args.steps,
        warmup=args.warmup,
        median_ms=round(med, 4),
        min_ms=round(times[0], 4),
        p10_ms=round(percentile(times, 0.1), 4),
        p90_ms=round(percentile(times, 0.9), 4),
        tokens_per_s=round(batch * seq / (med / 1e3), 1),
        last_loss=float(last.detach().float().cpu()) if last is not None else None,
    )
    if mode == "compile":
        import torch._dynamo

        breaks = torch._dynamo.utils.counters.get("graph_break", {})
        rec["graph_breaks"] = int(sum(breaks.values()))
        rec["graph_break_reasons"] = sorted(breaks)[:5]
    if rec["last_loss"] is not None and not math.isfinite(rec["last_loss"]):
        rec["warning"] = "the last loss is not finite"
    if mode == "eager" and (model_name, batch, seq) == args.profile_shape:
        rec["profile"] = profile_steps(torch, step, i, device, PROFILE_STEPS)
    del setup, forward
    return rec


PROFILE_STEPS = 3
PROFILE_ROWS = 25


def profile_steps(torch, step, i, device, steps):
    """`steps` more steps under torch.profiler; the operators with the most self time on the
    device (the CPU's when there is no GPU), most first, as dicts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(steps):
            step(i + k)
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        self_us = dev_us if device == "cuda" else e.self_cpu_time_total
        rows.append(dict(op=e.key, calls=int(e.count), self_us=round(float(self_us), 1)))
    rows = [r for r in rows if r["self_us"] > 0]
    rows.sort(key=lambda r: -r["self_us"])
    return dict(steps=steps, clock="device" if device == "cuda" else "cpu", total_us=round(sum(r["self_us"] for r in rows), 1), top=rows[:PROFILE_ROWS])


def criterion_results(root):
    """Every criterion benchmark under `root` (a target/criterion folder): id, median ns per
    iteration, throughput."""
    out = []
    for bj in sorted(Path(root).glob("**/new/benchmark.json")):
        est = bj.parent / "estimates.json"
        if not est.is_file():
            continue
        try:
            b = json.loads(bj.read_text())
            e = json.loads(est.read_text())
        except (OSError, ValueError):
            continue
        med_ns = e["median"]["point_estimate"]
        rec = dict(kind="criterion", id=b.get("full_id") or b.get("title"), group=b.get("group_id"), function=b.get("function_id"), median_ns=med_ns)
        tp = b.get("throughput")
        if isinstance(tp, dict) and tp:
            unit, amount = next(iter(tp.items()))
            per_s = amount / (med_ns / 1e9) if med_ns > 0 else None
            rec.update(throughput_unit=unit, throughput_per_iter=amount, throughput_per_s=per_s)
        out.append(rec)
    return out


def ratios(ours, torch_recs):
    """ours/torch for every (our train_step function, torch configuration) of the same shape."""
    out = []
    steps = {}
    for r in ours:
        g = r.get("group") or ""
        if g.startswith("train_step/"):
            steps.setdefault(g.split("/", 1)[1], {})[r["function"]] = r["median_ns"] / 1e6
    for t in torch_recs:
        if "median_ms" not in t or t["shape"] not in steps:
            continue
        for fn, ms in sorted(steps[t["shape"]].items()):
            out.append(dict(kind="ratio", shape=t["shape"], ours=fn, ours_ms=round(ms, 4), torch_mode=t["mode"], torch_precision=t["precision"], torch_ms=t["median_ms"], ours_over_torch=round(ms / t["median_ms"], 4)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"MODEL:BxT,... (models: {', '.join(MODELS)}; default {DEFAULT_SHAPES})")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (default both)")
    ap.add_argument("--compile-shapes", default=None, help="shapes that also run under torch.compile (default: all of --shapes)")
    ap.add_argument("--precisions", default="bf16,fp32", help="bf16 (autocast), fp32 (TF32 off) and/or tf32 (default bf16,fp32)")
    ap.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--ours", default=None, help="a target/criterion folder: print our results and the ratios too")
    ap.add_argument("--profile", default=None, metavar="MODEL:BxT", help="also profile that shape's eager steps with torch.profiler (one of --shapes)")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    args.profile_shape = None
    if args.profile:
        (args.profile_shape,) = parse_shapes(args.profile)
        if args.profile_shape not in shapes:
            raise SystemExit(f"error: --profile {args.profile} is not one of --shapes {args.shapes}")
    compile_shapes = set(parse_shapes(args.compile_shapes)) if args.compile_shapes else set(shapes)
    modes = [m for m in (x.strip() for x in args.modes.split(",")) if m]
    precisions = [p for p in (x.strip() for x in args.precisions.split(",")) if p]
    for m in modes:
        if m not in ("eager", "compile"):
            raise SystemExit(f"error: --modes: unknown mode `{m}`")
    for p in precisions:
        if p not in ("bf16", "fp32", "tf32"):
            raise SystemExit(f"error: --precisions: unknown precision `{p}`")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be at least 1 and --warmup at least 0")

    # Our results first: they are on disk already and must reach --json even when torch is
    # missing or this run is cut short.
    ours = []
    if args.ours:
        ours = criterion_results(args.ours)
        if not ours:
            print(f"bench_torch: no criterion results under {args.ours}", file=sys.stderr)
        for r in ours:
            emit(r, args.json)

    try:
        import torch
    except ImportError as e:
        fail_missing("torch", e)
    try:
        import transformers
    except ImportError as e:
        fail_missing("transformers", e)
    try:
        import adapters
    except ImportError as e:
        fail_missing("adapters", e)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda, but torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda}); use --device cpu for a dry run", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = dict(kind="env", tool="bench_torch", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__, adapters=adapters.__version__, device=args.device)
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, gpu_mem_gb=round(p.total_memory / 2**30, 1))
    else:
        env.update(threads=torch.get_num_threads())
    if adapters.__version__ != "1.3.0":
        env["warning"] = f"adapters {adapters.__version__}, not the pinned 1.3.0"
    emit(env, args.json)

    recs, failed = [], 0
    for model_name, b, t in shapes:
        for mode in modes:
            if mode == "compile" and (model_name, b, t) not in compile_shapes:
                continue
            for precision in precisions:
                print(f"bench_torch: {model_name}_{b}x{t} {mode} {precision} ...", file=sys.stderr, flush=True)
                try:
                    rec = run_config(torch, args, model_name, b, t, mode, precision, args.device)
                except Exception as e:  # one failed configuration must not hide the others
                    failed += 1
                    rec = dict(kind="torch_step", shape=f"{model_name}_{b}x{t}", model=model_name, batch=b, seq=t, mode=mode, precision=precision, device=args.device, error=f"{type(e).__name__}: {e}"[:2000])
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                prof = rec.pop("profile", None)
                emit(rec, args.json)
                recs.append(rec)
                if prof is not None:
                    emit(dict(kind="torch_profile", shape=rec["shape"], mode=mode, precision=precision, **prof), args.json)
                    print(f"\n{rec['shape']} {mode} {precision}: torch.profiler, {prof['steps']} steps, self {prof['clock']} time {prof['total_us'] / 1e3:.2f} ms in all", file=sys.stderr)
                    print("| op | calls | self µs | share |\n|---|---|---|---|", file=sys.stderr)
                    for r in prof["top"]:
                        share = 100 * r["self_us"] / prof["total_us"] if prof["total_us"] else 0
                        print(f"| `{r['op'][:80]}` | {r['calls']} | {r['self_us']:.1f} | {share:.1f} % |", file=sys.stderr)

    print("\n| shape | mode | precision | median ms | p10–p90 ms | tokens/s | peak MiB | note |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in recs:
        if "error" in r:
            print(f"| {r['shape']} | {r['mode']} | {r['precision']} | | | | | FAILED: {r['error'][:120]} |", file=sys.stderr)
            continue
        note = f"{r['graph_breaks']} graph breaks" if "graph_breaks" in r else ""
        print(f"| {r['shape']} | {r['mode']} | {r['precision']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}–{r['p90_ms']:.3f} | {r['tokens_per_s']:.0f} | {r.get('peak_mem_mb', '')} | {note} |", file=sys.stderr)

    if args.ours:
        rs = ratios(ours, recs)
        for r in rs:
            emit(r, args.json)
        if rs:
            print("\n| shape | ours | ours ms | vs torch | torch ms | ours / torch |", file=sys.stderr)
            print("|---|---|---|---|---|---|", file=sys.stderr)
            for r in rs:
                print(f"| {r['shape']} | {r['ours']} | {r['ours_ms']:.3f} | {r['torch_mode']} {r['torch_precision']} | {r['torch_ms']:.3f} | **{r['ours_over_torch']:.3f}** |", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
