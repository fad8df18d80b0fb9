"""Soak: the demo trainer with a live generator pool for ten minutes or more, once calm, once under chaos.

Both runs are ``python train.py`` on the demo (``configs/demo.yaml``) with ``--workers-per-device``
generator workers on the CPU and ``--hang-timeout``; they differ only in the chaos thread this
process runs against the chaos run's generator workers:

- every 20-60 s (uniform), SIGKILL a random generator worker;
- once (``--stop-at`` s in), SIGSTOP a worker for the hang timeout plus 15 s: the pool must find it
  hung, kill it and start another;
- once (``--fill-at`` s in), fill /dev/shm up to ``--shm-headroom`` MiB free for 60 s, with a
  SIGKILL inside that window, so a worker restarts while /dev/shm is full. Where /dev/shm is as
  large as the memory (here: 24 GiB on a 24 GiB machine) filling it would exhaust the memory, so
  the fill is capped at what leaves ``--memory-reserve`` GiB available and the report says how
  full it got; run the soak in a small /dev/shm of its own to fill it to the brim (below).

Measured per run, from the run's files and by sampling every process every 2 s: wall time,
epochs and steps completed, generator restarts, ring shortfall, the realised synthetic
fraction, the peak RSS of every process, the trainer's RSS over the run (growth from the
second quarter to the last), and the onlinemix segments left in /dev/shm afterwards. After the
chaos run every checkpoint it wrote is loaded (``weights_only``) and training resumes from its
``last.pth`` for 2 more epochs. Needs the demo world and the personalised demo generator
(``make demo`` makes both).

    .venv/bin/python benchmarks/soak.py                     # 2 x 120 epochs, about 11 min each on 2 cores
    unshare -m --propagation private sh -c \\
        'mount -t tmpfs -o size=2g tmpfs /dev/shm && .venv/bin/python benchmarks/soak.py'   # as root

Writes ``benchmarks/results/soak_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
from report import RESULTS, machine, write_report

from onlinemix.checkpoint import load_checkpoint
from onlinemix.segments import PREFIX, SHM_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILL = os.path.join(SHM_DIR, "soak-fill")


def generator_workers(trainer: psutil.Process) -> list:
    """The trainer's generator worker processes (spawned children; not the resource tracker)."""
    workers = []
    for child in trainer.children(recursive=True):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                workers.append(child)
        except psutil.Error:
            pass
    return workers


class MemoryWatch(threading.Thread):
    """Samples the RSS of the trainer and every descendant every ``every`` seconds."""

    def __init__(self, trainer: psutil.Process, every: float = 2.0):
        super().__init__(daemon=True)
        self.trainer, self.every, self.stop = trainer, every, threading.Event()
        self.peaks: dict = {}  # pid -> {"role", "peak_rss_mb"}
        self.trainer_series: list = []  # (seconds, rss MB)
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                processes = [self.trainer] + self.trainer.children(recursive=True)
            except psutil.Error:
                return
            workers = {p.pid for p in generator_workers(self.trainer)}
            for process in processes:
                try:
                    rss = process.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                role = "trainer" if process.pid == self.trainer.pid else (
                    "generator worker" if process.pid in workers else "helper")
                entry = self.peaks.setdefault(process.pid, {"role": role, "peak_rss_mb": 0.0})
                entry["peak_rss_mb"] = round(max(entry["peak_rss_mb"], rss), 1)
                if process.pid == self.trainer.pid:
                    self.trainer_series.append((round(time.monotonic() - self.start_time, 1), round(rss, 1)))


class Chaos(threading.Thread):
    """Kills, stops and starves the trainer's generator workers on a schedule; logs what it did."""

    def __init__(self, trainer: psutil.Process, *, hang_timeout: float, stop_at: float, fill_at: float,
                 headroom_mb: int, reserve_gb: float, seed: int):
        super().__init__(daemon=True)
        self.trainer, self.hang_timeout, self.stop_at, self.fill_at = trainer, hang_timeout, stop_at, fill_at
        self.headroom_mb, self.reserve_gb = headroom_mb, reserve_gb
        self.random, self.stop, self.log = random.Random(seed), threading.Event(), []
        self.start_time = time.monotonic()

    def note(self, event: str, **details) -> None:
        self.log.append({"t_s": round(time.monotonic() - self.start_time, 1), "event": event, **details})
        print(f"chaos {self.log[-1]}", flush=True)

    def victim(self):
        workers = generator_workers(self.trainer)
        return self.random.choice(workers) if workers else None

    def kill(self, why: str) -> None:
        worker = self.victim()
        if worker is None:
            self.note("no worker to kill", why=why)
            return
        try:
            worker.send_signal(signal.SIGKILL)
            self.note("SIGKILL", pid=worker.pid, why=why)
        except psutil.Error:
            self.note("worker gone before SIGKILL", pid=worker.pid)

    def run(self) -> None:
        next_kill = self.random.uniform(20, 60)
        stopped = filled = False
        while not self.stop.wait(1.0):
            now = time.monotonic() - self.start_time
            if not stopped and now >= self.stop_at:
                stopped = True
                self.stop_one()
            elif not filled and now >= self.fill_at:
                filled = True
                self.starve()
            elif now >= next_kill:
                self.kill("every 20-60 s")
                next_kill = now + self.random.uniform(20, 60)

    def stop_one(self) -> None:
        worker = self.victim()
        if worker is None:
            return
        hold = self.hang_timeout + 15
        worker.send_signal(signal.SIGSTOP)
        self.note("SIGSTOP", pid=worker.pid, seconds=hold)
        if self.stop.wait(hold):
            return
        try:
            worker.send_signal(signal.SIGCONT)
            self.note("SIGCONT: the pool had not killed it", pid=worker.pid)
        except psutil.NoSuchProcess:
            self.note("the pool had killed the stopped worker", pid=worker.pid)

    def starve(self) -> None:
        """Fill /dev/shm to ``headroom_mb`` free (capped by memory) for 60 s, killing a worker meanwhile."""
        stat = os.statvfs(SHM_DIR)
        free_mb = stat.f_bavail * stat.f_frsize / 2**20
        spare_mb = (psutil.virtual_memory().available / 2**30 - self.reserve_gb) * 1024
        fill_mb = int(max(0.0, min(free_mb - self.headroom_mb, spare_mb)))
        with open(FILL, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, fill_mb * 2**20)
        stat = os.statvfs(SHM_DIR)
        self.note("/dev/shm filled", filled_mb=fill_mb, free_mb=round(stat.f_bavail * stat.f_frsize / 2**20),
                  size_mb=round(stat.f_blocks * stat.f_frsize / 2**20),
                  capped_by_memory=spare_mb < free_mb - self.headroom_mb)
        if not self.stop.wait(20):
            self.kill("while /dev/shm is full")
        self.stop.wait(40)
        os.remove(FILL)
        self.note("/dev/shm emptied")


def shm_entries() -> list:
    """Everything in /dev/shm but the fill: ring and feedback segments, named semaphores, others'."""
    return sorted(n for n in os.listdir(SHM_DIR) if n != os.path.basename(FILL))


def last_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_command(args, name: str, epochs: int, *extra) -> list:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
            "--epochs", str(epochs), "--output", args.output, "--name", name, "--seed", str(args.seed),
            "--gen-workers-per-device", str(args.workers_per_device), "--gen-hang-timeout", str(args.hang_timeout),
            "--log-interval", "1000", *extra]


def run_trainer(args, name: str, *, chaos: bool) -> dict:
    """One training run; returns what it measured."""
    before = shm_entries()
    start = time.monotonic()
    log = open(os.path.join(args.output, f"{name}.log"), "w")
    process = subprocess.Popen(train_command(args, name, args.epochs), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    trainer = psutil.Process(process.pid)
    memory = MemoryWatch(trainer)
    memory.start()
    agent = None
    if chaos:
        agent = Chaos(trainer, hang_timeout=args.hang_timeout, stop_at=args.stop_at, fill_at=args.fill_at,
                      headroom_mb=args.shm_headroom, reserve_gb=args.memory_reserve, seed=args.seed)
        agent.start()
    code = process.wait()
    wall = time.monotonic() - start
    for thread in (memory, agent):
        if thread is not None:
            thread.stop.set()
            thread.join()
    if os.path.exists(FILL):
        os.remove(FILL)
    log.close()
    run_dir = os.path.join(args.output, name)
    metrics = last_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
    final = metrics[-1] if metrics else {}
    series = memory.trainer_series
    quarter = max(1, len(series) // 4)
    second, last = [r for _, r in series[quarter:2 * quarter]], [r for _, r in series[-quarter:]]
    generator = final.get("generator", {})
    return {
        "run": name, "chaos": chaos, "exit_code": code, "wall_s": round(wall, 1),
        "epochs_completed": len(metrics), "epochs_asked": args.epochs,
        "samples_trained": sum(m["augmentation"]["samples"] for m in metrics),
        "restarts": generator.get("restarts"), "generator_written": generator.get("written"),
        "generator_errors": sum(w.get("errors", 0) for w in generator.get("workers", [])),
        "ring_shortfall": final.get("ring", {}).get("shortfall"),
        "synthetic_fraction_last_epoch": final.get("augmentation", {}).get("replaced_fraction"),
        "synthetic_fraction_mean": round(sum(m["augmentation"]["replaced_fraction"] for m in metrics)
                                         / max(1, len(metrics)), 4),
        "test_top1": next((m["test"]["top1"] for m in reversed(metrics) if "test" in m), None),
        "trainer_rss_mb_second_quarter_peak": max(second) if second else None,
        "trainer_rss_mb_last_quarter_peak": max(last) if last else None,
        "peak_rss_mb": sorted(memory.peaks.values(), key=lambda e: -e["peak_rss_mb"]),
        "processes_seen": len(memory.peaks),
        "shm_entries_before": len(before), "shm_entries_left": [s for s in shm_entries() if s not in before],
        "onlinemix_segments_left": [s for s in shm_entries() if s.startswith(PREFIX)],
        "chaos_log": agent.log if agent else [],
    }


def check_checkpoints(args, name: str) -> dict:
    """Load every checkpoint of run ``name``, then resume its last.pth for 2 more epochs."""
    run_dir = os.path.join(args.output, name)
    loaded = {}
    for file in ("last.pth", "best.pth"):
        path = os.path.join(run_dir, file)
        if os.path.exists(path):
            loaded[file] = load_checkpoint(path)["epoch"]
    command = train_command(args, name, args.epochs + 2, "--resume", os.path.join(run_dir, "last.pth"))
    with open(os.path.join(args.output, f"{name}-resume.log"), "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    epochs = [m["epoch"] for m in last_metrics(run_dir)]
    return {"loaded_epochs": loaded, "resume_exit_code": code, "epochs_after_resume": epochs[-3:],
            "shm_entries_left_after_resume": shm_entries()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--workers-per-device", type=int, default=2)
    p.add_argument("--hang-timeout", type=float, default=30.0)
    p.add_argument("--stop-at", type=float, default=150.0, help="seconds into the chaos run to SIGSTOP a worker")
    p.add_argument("--fill-at", type=float, default=300.0, help="seconds into the chaos run to fill /dev/shm")
    p.add_argument("--shm-headroom", type=int, default=64, help="MiB left free in /dev/shm while it is filled")
    p.add_argument("--memory-reserve", type=float, default=4.0, help="GiB of memory the fill leaves available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="/tmp/onlinemix-soak")
    p.add_argument("--out", default=os.path.join(RESULTS, "soak_cpu.json"))
    args = p.parse_args(argv)
    for needed in ("data/demo", "runs/demo-ti-db"):
        if not os.path.isdir(os.path.join(ROOT, needed)):
            sys.exit(f"{needed} is missing: run `make demo` once first (it makes the demo world and generator).")
    if os.path.exists(args.output) and os.listdir(args.output):
        sys.exit(f"--output {args.output!r} is not empty; pass a new folder.")
    os.makedirs(args.output, exist_ok=True)
    runs = [run_trainer(args, "calm", chaos=False), run_trainer(args, "chaos", chaos=True)]
    runs[1]["checkpoints"] = check_checkpoints(args, "chaos")
    for run in runs:
        print({k: v for k, v in run.items() if k not in ("peak_rss_mb", "chaos_log")}, flush=True)
    stat = os.statvfs(SHM_DIR)
    return write_report("soak", args.out, vars(args), runs, machine=machine(),
                        shm_size_mb=round(stat.f_blocks * stat.f_frsize / 2**20),
                        memory_gb=round(psutil.virtual_memory().total / 2**30, 1))


if __name__ == "__main__":
    main()
