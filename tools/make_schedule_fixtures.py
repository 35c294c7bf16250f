#!/usr/bin/env python3
"""Learning-rate schedule fixtures: what transformers' schedulers give torch's AdamW at each step.

For each case (schedule, warmup steps, training steps, base lr), the learning rate each
`optimizer.step()` of a training loop uses, read from `param_groups[0]["lr"]` before the step, with
`scheduler.step()` after it (the Trainer's order), for `steps + 3` steps (past the end: the linear
schedule stays at 0). Also the weight of a parameter after those AdamW steps with a constant gradient
and weight decay, so a fixture pins how the schedule and the decay meet (decoupled decay scales with
the scheduled lr). Writes tests/fixtures/schedules.json; `src/train/schedule.rs` is checked against
it by tests/schedule.rs.

    /root/venv-fixtures/bin/python tools/make_schedule_fixtures.py   # tools/requirements.txt pins
"""
import json
import os

import torch
import transformers
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

CASES = [
    ("constant", 0, 10, 1e-3),
    ("constant", 4, 10, 1e-3),
    ("linear", 0, 10, 1e-3),
    ("linear", 3, 10, 2e-4),
    ("linear", 10, 10, 1e-3),
    ("linear", 12, 10, 1e-3),
    ("linear", 1, 1, 5e-4),
    ("linear", 7, 400, 1e-3),
]
WEIGHT_DECAY = 0.1


def run(schedule, warmup, steps, lr):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=WEIGHT_DECAY)
    if schedule == "constant":
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
    else:
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for _ in range(steps + 3):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
        opt.step()
        sched.step()
    return {"schedule": schedule, "warmup_steps": warmup, "steps": steps, "lr": lr, "weight_decay": WEIGHT_DECAY,
            "lrs": lrs, "param_after": p.detach().tolist()}


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "cases": [run(*c) for c in CASES]}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "schedules.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)}: {len(CASES)} cases")


if __name__ == "__main__":
    main()
