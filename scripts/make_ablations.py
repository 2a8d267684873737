#!/usr/bin/env python3
"""Write experiments/ablations/*.toml and experiments/orders/*.toml from the control file.

    python3 scripts/make_ablations.py

Every file is the control (experiments/strategies/control.toml: the built-in benchmark,
20 epochs per stage, lr 2e-3, 3 seeds) plus one change, so that each file answers one
question. Grids (EWC's lambda, the replay budget) are sweep axes, given in each file's header.
Standard library only; the files are committed, this script is how they were made.
"""
import itertools
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONTROL = open(os.path.join(ROOT, "experiments/strategies/control.toml")).read()
BODY = CONTROL[CONTROL.index('seed = 0'):]
BODY = BODY.replace("seeds = [0, 1, 2, 3, 4]", "seeds = [0, 1, 2]")

FROZEN_BN = 'freeze = "backbone_bn"\n'
LWF = "[lwf]\ntask_alpha = { seg = 10.0, det = 5.0 }\ntemperature = 2.0\n"


def later_stages(body, line):
    """`line` added to every stage but the first."""
    parts = body.split("[[stages]]")
    return "[[stages]]".join([parts[0], parts[1]] + [p.replace("warmup_epochs = 1\n", "warmup_epochs = 1\n" + line) for p in parts[2:]])


def write(folder, name, header, body, tables=""):
    text = "".join(f"# {h}\n" for h in header) + f'name = "{name}"\n' + body
    if tables:
        text = text.replace("[eval]", tables + "\n[eval]")
    path = os.path.join(ROOT, "experiments", folder, f"{name}.toml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)


def ablations():
    common = "Ablation on the built-in benchmark (the control plus one change), 3 seeds; see README: Strategies."
    write("ablations", "lwf_without_frozen_bn", [common, "LwF alone: the strategies' lwf.toml without frozen backbone BatchNorm."], BODY, LWF)
    write("ablations", "frozen_bn", [common, "Frozen backbone BatchNorm statistics after stage 1 alone (lwf.toml's other half)."], later_stages(BODY, FROZEN_BN))
    write("ablations", "ewc", [common, "Online EWC; the lambda grid: onehead sweep experiments/ablations/ewc*.toml --set ewc.lambda=10,100,1000,10000"], BODY, "[ewc]\nlambda = 100.0\n")
    write("ablations", "ewc_frozen_bn", [common, "Online EWC with frozen backbone BatchNorm; the same lambda grid as ewc.toml."], later_stages(BODY, FROZEN_BN), "[ewc]\nlambda = 100.0\n")
    write("ablations", "replay_budget", [common, "Rehearsal with a memory budget of `capacity` images per task; the grid:",
          "onehead sweep experiments/ablations/replay_budget.toml --set replay.capacity=10,30,100 (0 = the control; full = strategies/replay_balanced.toml)"],
          BODY, '[replay]\nenabled = true\nimages_per_batch = 8\nweight = 1.0\nnormalize = "reference"\npolicy = "reservoir"\ncapacity = 30\ncapacity_unit = "per_task"\n')
    write("ablations", "replay_budget_class_balanced", [common, "replay_budget.toml with a class-balanced buffer (as many images of each class as the per-task budget allows); the same capacity grid."],
          BODY, '[replay]\nenabled = true\nimages_per_batch = 8\nweight = 1.0\nnormalize = "reference"\npolicy = "class_balanced"\ncapacity = 30\ncapacity_unit = "per_task"\n')
    write("ablations", "distill_budget", [common, "strategies/der.toml (rehearsal with end-of-stage distillation) at a budget of 30 class-balanced images per task instead of every image:",
          "the goal's memory budget; the grid: onehead sweep experiments/ablations/distill_budget.toml --set replay.capacity=10,30,100"],
          BODY, DISTILL_BUDGET)
    write("ablations", "der_published", [common, "DER as published (Buzzega et al. 2020): 90-image reservoir (30 per task on average), MSE on raw outputs; alpha not tuned."],
          BODY, "[der]\nalpha = 0.5\ncapacity = 90\nimages_per_batch = 8\n")
    write("ablations", "derpp", [common, "DER++ as published: der_published.toml plus the buffered labels (beta); not tuned."],
          BODY, "[der]\nalpha = 0.5\nbeta = 0.5\ncapacity = 90\nimages_per_batch = 8\n")
    write("ablations", "agem", [common, "A-GEM (Chaudhry et al. 2019): 30 memory images per finished task, gradient projection."],
          BODY, "[agem]\nenabled = true\ncapacity = 30\nimages_per_batch = 8\n")
    converged = re.sub(r'(task = "seg"\nepochs = )20', r"\g<1>60", BODY)
    write("ablations", "seg_converged", [common, "The first stage trained 3x longer (60 epochs), so that later 'gains' on segmentation are not continued training."], converged)


DISTILL_BUDGET = '[replay]\nenabled = true\nimages_per_batch = 8\nweight = 0.5\nnormalize = "reference"\ndistill_alpha = 1.0\npolicy = "class_balanced"\ncapacity = 30\ncapacity_unit = "per_task"\n'


def orders():
    tasks = ["seg", "det", "cls"]
    stage = re.search(r'\[\[stages\]\]\ntask = "seg"\n(.*?)(?=\n\[\[stages\]\]|\n\[eval\])', BODY, re.S).group(1)
    head, tail = BODY[:BODY.index("[[stages]]")], BODY[BODY.index("[eval]"):]
    strategies = {
        "control": ("", ""),
        # Every task but the last one learned is distilled; cls (never distilled in the
        # default order) at weight 1, not tuned.
        "lwf": (FROZEN_BN, LWF.replace("det = 5.0 }", "det = 5.0, cls = 1.0 }")),
        # The goal's candidate (ablations/distill_budget.toml): rehearsal with end-of-stage
        # distillation, 30 class-balanced images per earlier task.
        "distill_budget": ("", DISTILL_BUDGET),
    }
    for perm in itertools.permutations(tasks):
        for strat, (later, tables) in strategies.items():
            stages = ""
            for k, t in enumerate(perm):
                stages += f"[[stages]]\ntask = \"{t}\"\n{stage.rstrip()}\n" + (later if k > 0 else "") + "\n"
            stages = stages.replace("\n\n\n", "\n\n")
            body = head + stages + (tables + "\n" if tables else "") + tail
            order = "_".join(perm)
            write("orders", f"{strat}__{order}", [f"Task order {' -> '.join(perm)} on the built-in benchmark, 3 seeds; {strat} (see README: Strategies)."], body)


if __name__ == "__main__":
    ablations()
    orders()
