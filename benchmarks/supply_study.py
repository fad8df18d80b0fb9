"""How much fresh generation does Diff-Mix need, and does online beat an offline set of the same cost?

On the demo config (Diff-Mix, uniform plan, p = 0.3), per seed:

- ``online-N``: ``train.py --aug diffmix --gen-budget N`` with ``--max-reuse`` set so that N unique
  samples can serve every request (ceil(1.25 x asked / N)); ``online-all`` has no budget and a
  ``--max-reuse`` of ``UNLIMITED_REUSE`` (the demo's 4 leaves p unmet), and its N is what its
  generator wrote;
- ``offline-N``: ``onlinemix generate --count N`` (the same generator and settings, seeded with the
  seed) made first, then ``train.py --aug replay --replay-dir SET`` at the same p;
- ``none``.

The offline sets of one seed are nested: ``generate`` plans a seeded stream of requests and cuts it
into tasks of ``--gen-batch-size``, so the first N samples of the largest set are the set that
``--count N`` makes (each N a multiple of the batch). The study renders the largest set once per
seed and copies its first N rows for the smaller ones; on the first seed it also renders the
smallest set on its own and records whether its images equal the prefix byte for byte. A smaller
set's generation seconds are the largest set's times N / largest (the same tasks), said in the
JSON.

Reported per arm: last-epoch test and counterfactual top-1 (mean ± s.e. over seeds), the realised
synthetic fraction, unique synthetic images, reads per unique image, the generator's busy seconds
(online: summed over epochs from the supply figures; offline: the wall-clock of ``generate``, Ray's
start included), and wall-clock including generation; paired differences (each arm minus ``none``,
online-N minus offline-N) over seeds. Every run is kept in the JSON as it finishes, and a rerun
skips the (arm, seed) pairs already there, so a study cut short resumes.

    python benchmarks/supply_study.py -- --eval-every 60     # 7 arms x 5 seeds as reported (evaluated once, at the end)
    python benchmarks/supply_study.py --seeds 0 1 --online-budgets 24 --offline-budgets 24 48 -- --epochs 1
                                                             # flags after -- go to train.py

Writes ``benchmarks/results/supply_study.json`` and ``supply_study.png``.
"""
from __future__ import annotations

import argparse
import csv
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import time

import yaml
from demo_study import called_target, epochs, mean_and_se, split_overrides
from report import RESULTS, machine, pyplot, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo asks for p x 96 samples x 60 epochs = 1 728 synthetic images a run: a set larger than that is
# never read whole. A budget binds only below what the generator makes unbudgeted (online-all's unique
# images in the JSON), so the online budgets stop lower than the offline sets.
ONLINE_BUDGETS = (24, 120)
OFFLINE_BUDGETS = (24, 120, 600)
# One generator actor per core: Ray gives each actor one CPU, so one actor would use half the machine.
GENERATE_WORKERS = 2
UNLIMITED_REUSE = 16
# configs/demo.yaml's keys that `onlinemix generate` takes too: the offline sets are made by the online generator.
GENERATOR_KEYS = ("dataset", "data_dir", "metaclass", "gen_model", "gen_finetuned", "gen_steps",
                  "gen_resolution", "gen_batch_size", "gen_dtype", "guidance")


def arms(online, offline) -> list:
    return ["none", "online-all", *(f"online-{n}" for n in online), *(f"offline-{n}" for n in offline)]


def train(name: str, args, extra: list) -> tuple[list, float]:
    """One ``train.py`` run in its own process; its per-epoch history and wall-clock seconds."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config, "--output", args.runs,
               "--name", name, *extra, *args.overrides]
    print(f"[{name}]", " ".join(command[1:]), flush=True)
    shutil.rmtree(os.path.join(args.runs, name), ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return epochs(os.path.join(args.runs, name)), time.perf_counter() - start


def setup(args) -> int:
    """Writes the demo world and personalises the demo generator (one epoch of a run does both, so no
    arm pays for them); returns the training samples per epoch."""
    history, _ = train("setup", args, ["--aug", args.aug, "--epochs", "1", "--seed", "0"])
    return history[-1]["augmentation"]["samples"]


def generate(out: str, count: int, seed: int, args) -> float:
    """``onlinemix generate`` of ``count`` samples of the study's strategy into ``out``; its wall-clock seconds."""
    with open(args.config) as f:
        config = yaml.safe_load(f)
    command = [sys.executable, "-m", "onlinemix.cli", "generate", "--aug", args.aug, "--count", str(count),
               "--seed", str(seed), "--out", out, "--cluster", "local", "--workers", str(GENERATE_WORKERS), "--gpus", "0"]
    for key in GENERATOR_KEYS:
        if key in config:
            value = config[key]
            command += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    print("[generate]", " ".join(command[3:]), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def prefix_set(full: str, out: str, count: int) -> None:
    """The first ``count`` samples of the set ``full``, copied to ``out`` (the set ``--count count`` makes)."""
    shutil.rmtree(out, ignore_errors=True)
    with open(os.path.join(full, "meta.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if int(row["Number"]) < count]
    if len(kept) != count:
        raise RuntimeError(f"{full} holds {len(kept)} samples numbered below {count}; it should hold them all.")
    for row in kept:
        target = os.path.join(out, "data", row["Path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(full, "data", row["Path"]), target)
    with open(os.path.join(out, "meta.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


def same_images(a: str, b: str) -> bool:
    """Whether sets ``a`` and ``b`` list the same paths with byte-identical images."""
    def paths(root):
        with open(os.path.join(root, "meta.csv"), newline="", encoding="utf-8") as f:
            return sorted(row["Path"] for row in csv.DictReader(f))
    return paths(a) == paths(b) and all(filecmp.cmp(os.path.join(a, "data", p), os.path.join(b, "data", p),
                                                    shallow=False) for p in paths(a))


def offline_sets(seed: int, args, report: dict) -> dict:
    """Per budget, the folder of seed ``seed``'s offline set and its generation seconds (made once)."""
    largest = max(args.offline_budgets)
    folder = os.path.join(args.runs, "sets", f"seed{seed}")
    full = os.path.join(folder, str(largest))
    made = report["generation"].get(str(seed))
    if made is None or not os.path.isfile(os.path.join(full, "meta.csv")):
        made = {"count": largest, "seconds": round(generate(full, largest, seed, args), 1)}
        report["generation"][str(seed)] = made
    for n in args.offline_budgets:
        if n != largest and not os.path.isfile(os.path.join(folder, str(n), "meta.csv")):
            prefix_set(full, os.path.join(folder, str(n)), n)
    if "prefix_equals_own_run" not in report and seed == args.seeds[0]:
        smallest = min(args.offline_budgets)
        own = os.path.join(folder, f"{smallest}-own-run")
        generate(own, smallest, seed, args)
        report["prefix_equals_own_run"] = {"count": smallest, "seed": seed,
                                           "equal": same_images(own, os.path.join(folder, str(smallest)))}
        shutil.rmtree(own)
    return {n: (os.path.join(folder, str(n)), made["seconds"] * n / largest) for n in args.offline_budgets}


def supply_totals(history: list) -> dict:
    """The run's supply figures summed over epochs: unique samples written, generator busy seconds and
    the mean age of the samples read."""
    supply = [e["supply"] for e in history if e.get("supply")]
    reads = sum(s["fresh_reads"] + s["reused_reads"] for s in supply)
    ages = sum(s["sample_age_s"] * (s["fresh_reads"] + s["reused_reads"]) for s in supply if s["sample_age_s"] is not None)
    busy = [s["generator_busy_s"] for s in supply]
    return {"unique": sum(s["written"] for s in supply),
            "generator_seconds": sum(busy) if None not in busy else None,
            "sample_age_s": ages / reads if reads else None}


def run_arm(arm: str, seed: int, args, sets: dict) -> dict:
    kind, _, size = arm.partition("-")
    extra = ["--seed", str(seed)]
    generation = 0.0
    if kind == "none":
        extra += ["--aug", "none"]
    elif kind == "online":
        extra += ["--aug", args.aug]
        if size == "all":
            extra += ["--max-reuse", str(UNLIMITED_REUSE)]
        else:
            extra += ["--gen-budget", size, "--max-reuse", str(math.ceil(1.25 * args.asked / int(size)))]
    else:
        folder, generation = sets[int(size)]
        extra += ["--aug", "replay", "--replay-dir", folder]
    history, seconds = train(f"{arm}-seed{seed}", args, extra)
    last = history[-1]
    row = dict(arm=arm, seed=seed, train_seconds=round(seconds, 1),
               synthetic_fraction=last["augmentation"]["replaced_fraction"],
               got=last["augmentation"]["replaced"],
               test=last["test"]["top1"], counterfactual=last["test_counterfactual"]["top1"])
    if kind == "online":
        row.update(supply_totals(history))
    elif kind == "offline":
        row.update(unique=int(size), generator_seconds=round(generation, 1))
    else:
        row.update(unique=0, generator_seconds=0.0)
    row["wall_seconds"] = round(seconds + (generation if kind == "offline" else 0.0), 1)
    row["reads_per_unique"] = row["got"] / row["unique"] if row["unique"] else None
    if called_target(history) is not None:
        row["synthetic_called_target"] = called_target(history)
    print(f"[{arm}-seed{seed}]", {k: row[k] for k in ("test", "counterfactual", "synthetic_fraction", "unique",
                                                      "wall_seconds")}, flush=True)
    return row


SUMMARISED = ("test", "counterfactual", "synthetic_fraction", "unique", "reads_per_unique", "generator_seconds",
              "wall_seconds", "sample_age_s", "synthetic_called_target")


def summarise(rows: list, names) -> dict:
    summary = {}
    for arm in names:
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            summary[arm] = {"seeds": len(mine), **{key: mean_and_se([r[key] for r in mine]) for key in SUMMARISED
                                                   if all(r.get(key) is not None for r in mine)}}
    return summary


def paired_differences(rows: list, online, offline) -> dict:
    by = {(r["arm"], r["seed"]): r for r in rows}
    pairs = [(arm, "none") for arm in arms(online, offline)[1:]]
    pairs += [(f"online-{n}", f"offline-{n}") for n in online if n in offline]
    pairs.append(("online-all", f"offline-{max(offline)}"))  # about the same generator seconds on the demo
    out = {}
    for a, b in pairs:
        seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
        if len(seeds) >= 2:
            out[f"{a} - {b}"] = {key: {**mean_and_se([by[a, s][key] - by[b, s][key] for s in seeds]), "seeds": len(seeds)}
                                 for key in ("test", "counterfactual")}
    return out


def plot(summary: dict, path: str) -> None:
    """Top-1 against unique synthetic images (log scale), online and offline, with ``none`` as a band."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, key in zip(axes, ("test", "counterfactual")):
        if "none" in summary:
            m, se = summary["none"][key]["mean"], summary["none"][key]["se"]
            ax.axhspan(m - se, m + se, color="grey", alpha=0.3, label="none (± s.e.)")
        for kind, marker in (("online", "o-"), ("offline", "s--")):
            points = sorted((s["unique"]["mean"], s[key]["mean"], s[key]["se"]) for arm, s in summary.items()
                            if arm.startswith(kind) and s["unique"]["mean"] > 0)
            if points:
                x, y, e = zip(*points)
                ax.errorbar(x, y, yerr=e, fmt=marker, capsize=3, label=kind)
        ax.set_xscale("log")
        ticks = sorted({round(s["unique"]["mean"]) for s in summary.values() if s["unique"]["mean"] > 0})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("unique synthetic images over the run")
        ax.set_ylabel(f"{key} top-1 (mean ± s.e.)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("supply study: Diff-Mix on the demo at p = 0.3, online against offline at equal N")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--online-budgets", nargs="+", type=int, default=list(ONLINE_BUDGETS),
                   help="--gen-budget of the budgeted online arms (unique synthetic images over the run)")
    p.add_argument("--offline-budgets", nargs="+", type=int, default=list(OFFLINE_BUDGETS),
                   help="--count of the offline sets, multiples of the config's gen_batch_size")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--aug", default="diffmix", help="the strategy of the online and offline arms")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "supply-study"), help="where runs and sets are written")
    p.add_argument("--out", default=os.path.join(RESULTS, "supply_study.json"))
    args = p.parse_args(argv)
    args.overrides = overrides
    with open(args.config) as f:
        config = yaml.safe_load(f)
    uneven = [n for n in args.offline_budgets if n % config["gen_batch_size"]]
    if uneven:  # a set of N is the first N // gen_batch_size tasks of the largest set
        p.error(f"--offline-budgets must be multiples of the config's gen_batch_size ({config['gen_batch_size']}); "
                f"got {uneven}.")
    names = arms(args.online_budgets, args.offline_budgets)
    settings = dict(config=config, aug=args.aug, train_overrides=overrides, seeds=args.seeds, online_budgets=args.online_budgets,
                    offline_budgets=args.offline_budgets,
                    unlimited_max_reuse=UNLIMITED_REUSE)
    report = {"rows": [], "generation": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        if earlier["settings"] == settings:  # resume: keep what finished
            report = {"rows": earlier["runs"], "generation": earlier["generation"]}
            if earlier["prefix_equals_own_run"] is not None:
                report["prefix_equals_own_run"] = earlier["prefix_equals_own_run"]
    samples = setup(args)
    args.asked = config["p"] * samples * int(overrides[overrides.index("--epochs") + 1] if "--epochs" in overrides
                                             else config["epochs"])
    plot_path = os.path.splitext(args.out)[0] + ".png"
    study_start = time.perf_counter()

    def save() -> dict:
        summary = summarise(report["rows"], names)
        written = write_report(
            "supply_study", args.out, settings, report["rows"], machine=machine(), samples_per_epoch=samples,
            asked_per_run=args.asked, summary=summary, paired_differences=paired_differences(report["rows"], args.online_budgets, args.offline_budgets),
            generation=report["generation"], prefix_equals_own_run=report.get("prefix_equals_own_run"),
            minutes_this_invocation=round((time.perf_counter() - study_start) / 60, 1), plot=os.path.basename(plot_path))
        plot(summary, plot_path)
        return written

    for seed in args.seeds:
        for arm in names:
            if any(r["arm"] == arm and r["seed"] == seed for r in report["rows"]):
                continue
            sets = offline_sets(seed, args, report) if arm.startswith("offline") else {}
            report["rows"].append(run_arm(arm, seed, args, sets))
            save()
    written = save()
    for arm, s in written["summary"].items():
        print(f"{arm:14s}", "  ".join(f"{k} {s[k]['mean']:.3f} ± {s[k]['se']:.3f}" for k in
                                      ("test", "counterfactual", "synthetic_fraction", "unique") if k in s))
    for pair, diff in written["paired_differences"].items():
        print(f"{pair:24s}", "  ".join(f"{k} {d['mean']:+.3f} ± {d['se']:.3f}" for k, d in diff.items()))
    return written


if __name__ == "__main__":
    main()
