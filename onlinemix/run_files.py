"""What a training run writes into its folder: ``RunRecorder`` (its options, the loss every few steps,
each epoch's metrics in JSON lines, CSV and TensorBoard, the last and best checkpoints, a grid of the
synthetic samples it trained on, the closed loop's heatmaps), the pieces it writes with, and what the
run says at the end of each epoch and of the run."""
from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from .checkpoint import save_or_warn


class RunRecorder:
    """Everything a run writes, done by the main process (timm's ``CheckpointSaver`` and ``update_summary``
    in one); on every other process each method does nothing.

    Files in ``run_dir``: ``args.yaml``; ``steps.csv``, the loss every ``log_interval`` steps; per epoch
    ``metrics.jsonl`` and ``metrics.csv`` (columns fixed for the run), TensorBoard scalars when tensorboard
    is installed, ``last.pth``, ``best.pth`` (best validation top-1; without a validation split the latest
    evaluated epoch), ``synthetic-epochNNN.png`` (``SampleGrid``) and, for a closed loop,
    ``policy-epochNNN.png`` at evaluations. Metrics are written before checkpoints, so a failed checkpoint
    write (``save_or_warn``) loses none.

    Args:
        run_dir: The run folder; made here with ``args.yaml``, unless it exists (a resumed run).
        class_names: Names of the classes, by label index.
        splits: Each evaluated split's name and whether it defines groups (``metrics_columns``).
        args: The run's resolved options: ``args.yaml`` and every checkpoint's ``args``.
        main: Whether this process writes.
        log_interval: Steps between rows of ``steps.csv``.
    """

    def __init__(self, run_dir: str, class_names: Sequence[str], splits: dict, *, args: dict, main: bool,
                 log_interval: int = 50):
        self.run_dir, self.class_names, self.args, self.main = run_dir, list(class_names), args, main
        self.log_interval = log_interval
        self.columns = metrics_columns(splits)
        self.grid = SampleGrid(class_names)
        self.best, self.failed_write, self.pairs = -1.0, False, None
        self.made = main and not os.path.isdir(run_dir)
        self.board = None
        if main:
            os.makedirs(run_dir, exist_ok=True)
            with open(self.path("args.yaml"), "w") as f:
                yaml.safe_dump(args, f, sort_keys=True)
            self.board = tensorboard(run_dir)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def resumed(self, epoch: int, best: float) -> None:
        """Go on from a checkpoint: ``epoch`` (0-based) is the next to train, ``best`` its best score; the
        interrupted epoch's step rows are dropped, as they are trained again."""
        self.best = best
        if self.main:
            trim_steps(self.path("steps.csv"), epoch)

    def step(self, epoch: int, step: int, loss: float, lr: float, mix, logits: torch.Tensor) -> None:
        """After a training step: its loss (every ``log_interval`` steps), and the synthetic samples of
        ``mix`` (a ``DiffMix``, its ``recent`` and ``synthetic``) for the epoch's grid."""
        if not self.main:
            return
        self.grid.add(mix.recent, mix.synthetic, logits)
        if step % self.log_interval == 0:
            log_step(self.path("steps.csv"), epoch, step, loss, lr)

    def epoch(self, result: dict, training_state: dict, *, evaluated: bool, policy: Optional[dict] = None) -> None:
        """After an epoch: its metrics, then ``last.pth`` (and ``best.pth`` when validation top-1 rose), the
        grid, the closed loop's heatmap and TensorBoard.

        Args:
            result: The epoch's metrics (``epoch`` 0-based, as ``write_metrics`` reads them).
            training_state: What a resume needs besides ``epoch``, ``best`` and ``args``: model, optimizer,
                scheduler, scaler and random states.
            evaluated: Whether ``result`` holds this epoch's evaluation.
            policy: The closed loop's ``ClosedLoop.epoch_state()``, or None.

        Raises:
            CheckpointWriteError: two checkpoint writes in a row failed.
        """
        if not self.main:
            return
        epoch = result["epoch"]
        write_metrics(result, self.path("metrics.jsonl"), self.path("metrics.csv"), self.columns)
        score = result.get("val", {}).get("top1", -epoch) if evaluated else self.best
        checkpoint = {**training_state, "epoch": epoch, "best": max(self.best, score), "args": self.args}
        self.failed_write = save_or_warn(checkpoint, self.path("last.pth"), self.failed_write)
        if evaluated and score > self.best and not self.failed_write:
            self.best = score
            self.failed_write = save_or_warn(checkpoint, self.path("best.pth"), self.failed_write)
        self.grid.save(self.path(f"synthetic-epoch{epoch + 1:03d}.png"), epoch + 1)
        if policy is not None:
            # Drawn at evaluations only: a figure every epoch would slow the trainer, which gives
            # the generator more time and so changes the synthetic budget against uniform runs.
            self.pairs = policy["pairs"] + (self.pairs if self.pairs is not None else 0)
            if evaluated:
                save_policy_heatmap(policy["confusion"], self.pairs, self.class_names,
                                    self.path(f"policy-epoch{epoch + 1:03d}.png"))
                self.pairs = None
        if self.board is not None:
            for key, value in flat_scalars(result).items():
                self.board.add_scalar(key, value, epoch + 1)
            self.board.flush()

    def close(self, *, trained: bool) -> None:
        """Close TensorBoard; a folder this recorder made for a run that trained nothing (its generator
        failed the warm-up) is removed."""
        if self.board is not None:
            self.board.close()
        if self.made and not trained:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def summary(self, result: dict, *, validated: bool) -> str:
        """``run_summary`` of the run's last ``result``; the best validation top-1 when it had a validation split."""
        return run_summary(self.run_dir, result, self.best if validated else None)


def tensorboard(run_dir: str):
    """A TensorBoard writer in the run directory when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(run_dir)


def flat_scalars(result: dict, prefix: str = "") -> dict:
    """The numbers of a nested metrics dict, keyed like ``val/top1``."""
    scalars = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            scalars.update(flat_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            scalars[name] = value
    return scalars


def log_step(path: str, epoch: int, step: int, loss: float, lr: float) -> None:
    """Append one row to the step log (``epoch,step,loss,lr``)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch", "step", "loss", "lr"])
        writer.writerow([epoch, step, f"{loss:.6f}", lr])


def trim_steps(path: str, epoch: int) -> None:
    """Drop the step log's rows of ``epoch`` and later: a resumed run trains them again and logs them anew."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if int(row[0]) < epoch]
    if len(kept) < len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def run_summary(run_dir: str, result: dict, best_val: Optional[float]) -> str:
    """What a finished run tells its user: the last epoch's accuracy, the best validation top-1, where its files are."""
    accuracy = ", ".join(f"{split} top-1 {metrics['top1']:.4f}" for split, metrics in result.items()
                         if isinstance(metrics, dict) and "top1" in metrics) or "not evaluated"
    best = f"; best val top-1 {best_val:.4f} (best.pth)" if best_val is not None else ""
    grids = len([f for f in os.listdir(run_dir) if f.startswith("synthetic-epoch")]) if os.path.isdir(run_dir) else 0
    files = "last.pth, best.pth, metrics.csv and metrics.jsonl, steps.csv"
    if grids:
        files += f", {grids} grids of the synthetic samples (synthetic-epochNNN.png)"
    return (f"finished {result['epoch'] + 1} epochs: {accuracy}{best}\n"
            f"run folder {os.path.abspath(run_dir)}: {files}")


def epoch_line(result: dict) -> str:
    """An epoch's log line: loss, accuracy per evaluated split, the synthetic share, and what the
    classifier called the synthetic samples."""
    accuracy = ", ".join(f"{split} top1 {metrics['top1']:.4f}" for split, metrics in result.items()
                         if isinstance(metrics, dict) and "top1" in metrics) or "not evaluated"
    called = ""
    if "fidelity" in result:
        shares = result["fidelity"]["all"]
        first = f", target on first reads {shares['first_read']['target']:.2f}" if "first_read" in shares else ""
        called = f" (classifier calls it target {shares['target']:.2f}, source {shares['source']:.2f}{first})"
    supply = ""
    if "supply" in result:
        figures = result["supply"]
        supply = (f"; got {figures['got']} of {figures['asked']} synthetic asked ({figures['fresh_reads']} fresh, "
                  f"{figures['reused_reads']} reused), generator {figures['generator_images_per_s']:.2f} images/s "
                  f"for {figures['demand_images_per_s']:.2f} asked")
    return (f"epoch {result['epoch'] + 1}: loss {result['train_loss']:.4f}, {accuracy}, synthetic "
            f"{result['augmentation']['replaced_fraction']:.3f}{called}{supply}")


FIDELITY_COLUMNS = ("synthetic_called_target", "synthetic_called_source", "synthetic_first_read_called_target")
# The epoch's supply against demand (onlinemix.supply.supply_figures), "supply_" + the figure's name.
SUPPLY_FIGURES = ("asked", "got", "fresh_reads", "reused_reads", "generator_images_per_s", "demand_images_per_s",
                  "ring_occupancy", "sample_age_s")


def metrics_columns(splits: dict) -> list:
    """The columns of ``metrics.csv``, fixed for the whole run so that every row has all of them.

    Args:
        splits: Each evaluated split's name and whether it defines groups (a ``worst_group`` column).
    """
    columns = ["epoch", "train_loss", "lr", "synthetic_fraction", *FIDELITY_COLUMNS,
               *(f"supply_{name}" for name in SUPPLY_FIGURES)]
    for split, grouped in splits.items():
        columns += [f"{split}_top1", f"{split}_top5", f"{split}_balanced_top1"]
        if grouped:
            columns.append(f"{split}_worst_group")
    return columns


def write_metrics(result: dict, jsonl: str, csv_path: str, columns: Sequence[str]) -> None:
    """Append an epoch's metrics: all of them to ``jsonl``, the headline numbers to ``csv_path`` under
    ``columns`` (``metrics_columns``); what the epoch did not measure (an epoch not evaluated) stays empty."""
    with open(jsonl, "a") as f:
        f.write(json.dumps(result) + "\n")
    row = {"epoch": result["epoch"], "train_loss": result["train_loss"], "lr": result["lr"],
           "synthetic_fraction": result["augmentation"]["replaced_fraction"]}
    if "fidelity" in result:
        shares = result["fidelity"]["all"]
        row["synthetic_called_target"], row["synthetic_called_source"] = shares["target"], shares["source"]
        if "first_read" in shares:
            row["synthetic_first_read_called_target"] = shares["first_read"]["target"]
    for name in SUPPLY_FIGURES if "supply" in result else ():
        row[f"supply_{name}"] = result["supply"][name]
    for split, metrics in result.items():
        if isinstance(metrics, dict) and "top1" in metrics:
            row[f"{split}_top1"], row[f"{split}_top5"] = metrics["top1"], metrics["top5"]
            row[f"{split}_balanced_top1"] = metrics["balanced_top1"]
            if "worst_group" in metrics:
                row[f"{split}_worst_group"] = metrics["worst_group"]
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def tile_caption(class_names: Sequence[str], target: int, source: int, label: torch.Tensor, strength: float,
                 called: Optional[int]) -> list[str]:
    """The three caption lines of one synthetic sample: the label weight and name of the class its prompt
    asked for, the same for the reference image's class, then the strength and the classifier's top-1
    call ("target", "source" or the class's name). Weights come first so that a long name cut to the
    tile's width loses nothing else."""
    lines = [f"to {float(label[target]):.2f}: {class_names[target]}",
             "from: the same class" if source == target else f"from {float(label[source]):.2f}: {class_names[source]}"]
    call = ("" if called is None else ", called: target" if called == target
            else ", called: source" if called == source else f", called: {class_names[called]}")
    return lines + [f"s={strength:.2f}{call}"]


class SampleGrid:
    """The first ``tiles`` synthetic samples the classifier trained on in an epoch, drawn as one
    image: a legend, then each sample over its ``tile_caption``.

    Feed ``add`` every training step; ``save`` writes the epoch's grid and starts the next one.
    A fixed count per epoch makes grids of different epochs and runs comparable.

    Args:
        class_names: Names of the classes, by label index.
        tiles: Samples per grid (fewer only when the epoch trained on fewer).
        tile_size: Side in pixels each sample is drawn at.
    """

    COLUMNS, LINE = 8, 12

    def __init__(self, class_names: Sequence[str], *, tiles: int = 16, tile_size: int = 128):
        self.class_names = list(class_names)
        self.tiles = int(tiles)
        self.tile_size = int(tile_size)
        self.entries = []
        self.seen = 0

    def add(self, recent: Optional[tuple], synthetic, logits: torch.Tensor) -> None:
        """Keep this step's synthetic samples until the grid is full.

        Args:
            recent: ``DiffMix.recent``, (uint8 ``[K, 3, H, W]`` images, ``[K, C]`` labels) of this step.
            synthetic: ``DiffMix.synthetic`` of this step; None when it replaced nothing.
            logits: The classifier's ``[B, C]`` output on the batch.
        """
        if synthetic is None or recent is None:
            return
        self.seen += len(synthetic.rows)
        room = self.tiles - len(self.entries)
        if room <= 0:
            return
        called = logits.detach()[synthetic.rows[:room].to(logits.device)].argmax(1).cpu().tolist()
        images, labels = recent
        for k in range(min(room, len(synthetic.rows))):
            self.entries.append((images[k].cpu(), tile_caption(
                self.class_names, int(synthetic.target[k]), int(synthetic.source[k]), labels[k],
                float(synthetic.strength[k]), called[k])))

    def save(self, path: str, epoch: int) -> bool:
        """Write the grid of ``epoch`` (1-based) to ``path`` and start the next; False, writing nothing,
        when the epoch trained on no synthetic sample."""
        from PIL import Image, ImageDraw, ImageFont
        from torchvision.transforms.functional import to_pil_image

        entries, seen = self.entries, self.seen
        self.entries, self.seen = [], 0
        if not entries:
            return False
        font = ImageFont.load_default()
        legend = [f"epoch {epoch}: the first {len(entries)} of the {seen} synthetic samples the classifier "
                  "trained on this epoch.",
                  "Under each: to = the label weight and name of the class its prompt asked for; from = the "
                  "same for the reference image's class;",
                  "s = the SDEdit strength; called = the classifier's top-1 on it when it trained on it (target: "
                  "the prompt's class, source: the reference's)."]
        width = self.COLUMNS * self.tile_size
        legend_height = len(legend) * self.LINE + 8
        cell = self.tile_size + 3 * self.LINE + 6
        rows = -(-len(entries) // self.COLUMNS)
        canvas = Image.new("RGB", (width, legend_height + rows * cell), "white")
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(legend):
            draw.text((4, 4 + i * self.LINE), line, fill="black", font=font)
        for k, (image, lines) in enumerate(entries):
            x, y = (k % self.COLUMNS) * self.tile_size, legend_height + (k // self.COLUMNS) * cell
            canvas.paste(to_pil_image(image).resize((self.tile_size, self.tile_size)), (x, y))
            for i, line in enumerate(lines):
                draw.text((x + 2, y + self.tile_size + 2 + i * self.LINE), fit(draw, line, font, self.tile_size - 4),
                          fill="black", font=font)
        canvas.save(path)
        return True


def fit(draw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_policy_heatmap(confusion: np.ndarray, pairs: np.ndarray, class_names: Sequence[str], path: str) -> None:
    """The closed loop side by side: the classifier's confusion on real images (true × called) that
    drives the generator, and the (target × source) pairs the classifier trained on since the last figure.
    Drawn with matplotlib when it is installed (the ``bench`` extra), else skipped."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(4 + 0.25 * len(class_names), 14)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    ticks = range(len(class_names)) if len(class_names) <= 40 else []
    for ax, matrix, title, ylabel, xlabel in (
            (axes[0], confusion * (1 - np.eye(len(confusion))), "confusion on real images (diagonal left out)",
             "true class", "called"),
            (axes[1], pairs, "synthetic pairs trained on since the last figure", "target class", "source class (reference image)")):
        image = ax.imshow(matrix, cmap="viridis")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=ticks, yticks=ticks)
        if ticks:
            ax.set_xticklabels(class_names, rotation=90, fontsize=7)
            ax.set_yticklabels(class_names, fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
