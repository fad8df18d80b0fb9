"""Does Diff-Mix help on the demo world? The same classifier, budget and data under each augmentation.

Every (augmentation, seed) pair is one ``python train.py --config configs/demo.yaml --aug AUG
--seed SEED`` run in its own process, with the generator (where the augmentation uses one)
in a process of its own on the CPU, as in the quick start. The personalised generator is
made once (configs/finetune/demo.yaml) and shared by every run, and so are the distilled student
``diffmix-4step`` runs (configs/distill/demo.yaml), Diffusion Inversion's condition store (configs/invert/demo.yaml) where ``diffinversion`` runs and the
demo world's caption store (``onlinemix caption --captioner demo``) where ``sgid`` runs. Reported per augmentation:
the last epoch's top-1 accuracy on the in-distribution test set and on the counterfactual
set (every bird on its other background), the counterfactual worst-group accuracy, the
realised synthetic fraction and the share of synthetic samples the classifier called their
target class over the run (the fidelity monitor), as mean ± standard error over seeds;
beside each accuracy mean the test set's own sampling error (sqrt(a(1 - a) / n) for accuracy a on n images), which
the seed error does not contain: every seed is evaluated on the same images. Paired
differences (Diff-Mix minus each baseline, seed by seed) are reported with their standard
error over seeds. The report is rewritten after every run, so a study cut short keeps
what finished.

    python benchmarks/demo_study.py                                   # 8 augmentations x 5 seeds
    python benchmarks/demo_study.py --augs none diffmix --seeds 0 -- --epochs 2   # flags after -- go to train.py
    python benchmarks/demo_study.py --augs none diffmix diffmix-4step --out benchmarks/results/distill_study.json
    python benchmarks/demo_study.py --augs diffmix diffmix@confusion diffmix@hard-class \
        --out benchmarks/results/closed_loop_study.json -- --ring-slots 48 --feedback-every 3   # the closed loop

Writes ``benchmarks/results/demo_study.json`` and ``demo_study.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from report import RESULTS, machine, pyplot, write_report

from onlinemix.generator.adapters import DISTILL_JSON
from onlinemix.generator.conditions import STORE_JSON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGS = ("none", "cutmix", "diffaug", "realmix", "diffmix", "diffmix+cutmix", "diffinversion", "sgid")
# The closed loop: an augmentation with a planning policy, spelled AUG@POLICY (train.py --gen-policy POLICY).
POLICY_AUGS = ("diffmix@confusion", "diffmix@hard-class")
# Diff-Mix from `onlinemix distill`'s student (--distill-config, made once): 4 LCM steps inside each strength,
# guidance 1 (baked in), one U-Net call per step.
DISTILLED_AUGS = ("diffmix-4step",)
DISTILLED_SAMPLING = ["--gen-scheduler", "lcm-strength", "--guidance", "1", "--gen-steps", "4"]
METRICS = {"test": ("test", "top1"), "counterfactual": ("test_counterfactual", "top1"),
           "counterfactual_worst_group": ("test_counterfactual", "worst_group")}
# What Diff-Mix is compared with, seed by seed.
PAIRS = (("diffmix", "none"), ("diffmix", "diffaug"), ("diffmix", "realmix"), ("diffmix+cutmix", "cutmix"),
         ("diffmix@confusion", "diffmix"), ("diffmix@hard-class", "diffmix"), ("diffinversion", "none"),
         ("diffinversion", "diffaug"), ("diffmix", "diffinversion"), ("sgid", "none"), ("sgid", "diffaug"),
         ("diffmix-4step", "diffmix"), ("diffmix-4step", "none"))


def epochs(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f.read().strip().splitlines()]


def called_target(history: list, *, first_read: bool = False, strength: str = "all"):
    """The share of all synthetic samples of a run (or of those at ``strength``, e.g. "s=0.7") that the
    classifier called their target class (the fidelity monitor's counts summed over epochs; one epoch holds
    only a few dozen), over every read or over each sample's first; None without any."""
    counts = [e["fidelity"][strength] for e in history if strength in e.get("fidelity", {})]
    if first_read:
        counts = [c["first_read"] for c in counts if "first_read" in c]
    total = sum(c["count"] for c in counts)
    return sum(c["count"] * c["target"] for c in counts) / total if total else None


def policy_summary(history: list) -> dict:
    """For a closed-loop run: the mean over epochs of the share of synthetic samples on pairs the
    classifier confuses, and the last epoch's error on real training images (the EMA)."""
    states = [e["policy"] for e in history if "policy" in e]
    shares = [s["pairs_on_confusions"] for s in states if s["pairs_on_confusions"] is not None]
    return {"policy_pairs_on_confusions": float(np.mean(shares)) if shares else None,
            "policy_train_error": states[-1]["error"] if states else None,
            "policy_publications": states[-1]["publication"] if states else 0}


def run(aug: str, seed: int, args, overrides: list) -> dict:
    name = f"{aug}-seed{seed}"
    base, _, policy = aug.partition("@")
    distilled = base in DISTILLED_AUGS
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config, "--aug",
               "diffmix" if distilled else base, "--seed", str(seed), "--output", args.runs, "--name", name,
               *overrides]
    if policy:
        command += ["--gen-policy", policy]
    if distilled:
        command += ["--gen-accelerator", acceleration_lora(args.distill_config), *DISTILLED_SAMPLING]
    if base == "diffinversion":
        command += ["--inversion", condition_store(args.invert_config)]
    if base == "sgid":
        command += ["--captions", caption_store(args.captions)]
    print(f"[{name}]", " ".join(command[1:]), flush=True)
    shutil.rmtree(os.path.join(args.runs, name), ignore_errors=True)  # an earlier study's run: train.py would not reuse it
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    history = epochs(os.path.join(args.runs, name))
    result = history[-1]
    row = dict(aug=aug, seed=seed, seconds=round(time.perf_counter() - start, 1),
               synthetic_fraction=result["augmentation"]["replaced_fraction"])
    for key, (split, metric) in METRICS.items():
        row[key] = result[split][metric]
    row["test_images"] = result["test"]["images"]
    row["counterfactual_images"] = result["test_counterfactual"]["images"]
    if called_target(history) is not None:
        row["synthetic_called_target"] = called_target(history)
    if called_target(history, first_read=True) is not None:
        row["synthetic_first_read_called_target"] = called_target(history, first_read=True)
        strengths = sorted({key for e in history for key in e.get("fidelity", {}) if key.startswith("s=")})
        row["first_read_called_target_by_strength"] = {
            key: called_target(history, first_read=True, strength=key) for key in strengths}
    if policy:
        row.update(policy_summary(history))
    print(f"[{name}]", {k: row[k] for k in (*METRICS, "synthetic_fraction", "seconds")}, flush=True)
    return row


def made_once(command: str, config: str, facts: str, keys: tuple) -> str:
    """The output folder of ``onlinemix COMMAND --config config``, made first if it holds no ``facts`` file or
    one whose ``keys`` differ from the recipe's (an earlier config, or an earlier version of the command)."""
    import yaml

    with open(config) as f:
        recipe = yaml.safe_load(f)
    out = os.path.join(ROOT, recipe["out"])
    info = {}
    if os.path.isfile(os.path.join(out, facts)):
        with open(os.path.join(out, facts)) as f:
            info = json.load(f)
    if any(info.get(key) != recipe.get(key) for key in keys if key in recipe):
        print(f"[{command}] onlinemix {command} --config {config} --out {out}", flush=True)
        subprocess.run([sys.executable, "-m", "onlinemix.cli", command, "--config", config, "--out", out,
                        "--overwrite"], check=True, cwd=ROOT)
    return out


def condition_store(config: str) -> str:
    """The condition store of ``onlinemix invert --config config`` (``made_once``)."""
    return made_once("invert", config, STORE_JSON, ("vectors", "resolution", "group_size", "batch_size",
                                                    "updates_per_image", "lr", "weight_decay", "seed"))


def acceleration_lora(config: str) -> str:
    """The acceleration LoRA of ``onlinemix distill --config config`` (``made_once``)."""
    return made_once("distill", config, DISTILL_JSON, ("steps", "rank", "lr", "batch_size", "resolution",
                                                       "max_strength", "solver_steps", "seed"))


def caption_store(path: str) -> str:
    """The demo world's caption store at ``path`` (``onlinemix caption --captioner demo``), made first if missing."""
    if not os.path.isfile(path):
        print(f"[store] onlinemix caption --captioner demo --out {path}", flush=True)
        subprocess.run([sys.executable, "-m", "onlinemix.cli", "caption", "--dataset", "demo", "--data-dir",
                        os.path.join(ROOT, "data", "demo"), "--captioner", "demo", "--out", path], check=True,
                       cwd=ROOT)
    return path


def mean_and_se(values) -> dict:
    """Mean and standard error over seeds (sample standard deviation / sqrt(n))."""
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": se}


def summarise(rows: list, augs) -> dict:
    """Per augmentation and metric: mean and seed standard error; for the accuracies on a test set also
    its sampling error at the mean (binomial, the set's image count)."""
    summary = {}
    for aug in augs:
        mine = [r for r in rows if r["aug"] == aug]
        if not mine:
            continue
        summary[aug] = {"seeds": len(mine)}
        for key in (*METRICS, "synthetic_fraction", "synthetic_called_target", "synthetic_first_read_called_target",
                    "policy_pairs_on_confusions", "policy_train_error"):
            if all(r.get(key) is not None for r in mine):
                summary[aug][key] = mean_and_se([r[key] for r in mine])
        for key, images in (("test", "test_images"), ("counterfactual", "counterfactual_images")):
            a, n = summary[aug][key]["mean"], mine[0][images]
            summary[aug][key]["sampling_se"] = float(np.sqrt(a * (1 - a) / n))
    return summary


def paired_differences(rows: list) -> dict:
    """``{"diffmix - none": {metric: {mean, se, seeds}}}`` over the seeds both augmentations ran."""
    by = {(r["aug"], r["seed"]): r for r in rows}
    out = {}
    for a, b in PAIRS:
        seeds = sorted(s for (aug, s) in by if aug == a and (b, s) in by)
        if len(seeds) < 2:
            continue
        out[f"{a} - {b}"] = {key: {**mean_and_se([by[a, s][key] - by[b, s][key] for s in seeds]), "seeds": len(seeds)}
                             for key in ("test", "counterfactual")}
    return out


def plot(summary: dict, path: str) -> None:
    """Bars of test and counterfactual top-1 per augmentation, with ± 1 standard error over seeds."""
    plt = pyplot()
    augs = list(summary)
    x = np.arange(len(augs))
    fig, ax = plt.subplots(figsize=(1.3 * len(augs) + 2, 4), layout="constrained")
    for offset, key in ((-0.2, "test"), (0.2, "counterfactual")):
        means = [summary[aug][key]["mean"] for aug in augs]
        errors = [summary[aug][key]["se"] if np.isfinite(summary[aug][key]["se"]) else 0 for aug in augs]
        ax.bar(x + offset, means, width=0.4, yerr=errors, capsize=3, label=f"{key} top-1 (mean ± s.e.)")
    ax.set_xticks(x, augs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("demo study: last-epoch accuracy per augmentation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_overrides(argv=None) -> tuple[list, list]:
    """``(study arguments, train.py overrides)``: the overrides are what follows ``--``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def main(argv=None) -> dict:
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--augs", nargs="+", choices=AUGS + POLICY_AUGS + DISTILLED_AUGS, default=list(AUGS),
                   help="augmentations; AUG@POLICY runs AUG with train.py --gen-policy POLICY")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--invert-config", default=os.path.join(ROOT, "configs", "invert", "demo.yaml"),
                   help="`onlinemix invert` config of the condition store diffinversion runs share")
    p.add_argument("--distill-config", default=os.path.join(ROOT, "configs", "distill", "demo.yaml"),
                   help="`onlinemix distill` config of the acceleration LoRA diffmix-4step runs share")
    p.add_argument("--captions", default=os.path.join(ROOT, "runs", "demo-captions.json"),
                   help="the demo world's caption store sgid runs share (made first if missing)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "demo-study"), help="where the runs are written")
    p.add_argument("--out", default=os.path.join(RESULTS, "demo_study.json"))
    args = p.parse_args(argv)

    with open(args.config) as f:
        config = f.read()
    plot_path = os.path.splitext(args.out)[0] + ".png"
    rows = []
    for seed in args.seeds:
        for aug in args.augs:
            rows.append(run(aug, seed, args, overrides))
            summary = summarise(rows, args.augs)
            report = write_report("demo_study", args.out, dict(config=config, train_overrides=overrides,
                                                               seeds=args.seeds), rows, machine=machine(),
                                  summary=summary, paired_differences=paired_differences(rows),
                                  plot=os.path.basename(plot_path))
    for aug, s in summary.items():
        print(f"{aug:16s}", "  ".join(f"{k} {s[k]['mean']:.3f} ± {s[k]['se']:.3f}" for k in (*METRICS,
                                                                                            "synthetic_fraction")))
    for pair, diff in report["paired_differences"].items():
        print(f"{pair:24s}", "  ".join(f"{k} {d['mean']:+.3f} ± {d['se']:.3f}" for k, d in diff.items()))
    plot(summary, plot_path)
    return report


if __name__ == "__main__":
    main()
