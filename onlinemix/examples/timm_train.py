"""Online Diff-Mix in a timm recipe: the change to timm's ``train.py``, runnable.

timm's ``train.py`` builds ``Mixup(**mixup_args)`` (or ``FastCollateMixup(**mixup_args)``
when the prefetcher is on). With onlinemix, start a generator pool that fills a
shared-memory ring, then build ``DiffMix`` / ``DiffMixCollate`` in their place, with the
same ``mixup_args``; the loss stays ``SoftTargetCrossEntropy``::

    factory = DiffusionProducerFactory(spec, references, class_names, metaclass)
    ring, pool = create_ring_and_pool(factory, ["cuda:1"], slots=256, image_size=img_size)   # onlinemix.augmentation
    pool.start().warm_up(batch_size, timeout=60)                               # optional head start
    mixup_fn = DiffMix(**mixup_args, source=ring, p=0.1, gamma=0.5)            # was Mixup(**mixup_args)
    collate_fn = DiffMixCollate(**mixup_args, source=ring, p=0.1, gamma=0.5)   # was FastCollateMixup(...)
    ...
    pool.stop(); ring.close()                                                   # at the end of training

Every line that differs from timm's recipe is marked ``# onlinemix``. This script is
that recipe in miniature (timm's data set, loader, model, optimiser, scheduler and
loss), so it runs as it is::

    python -m onlinemix.examples.timm_train --data-dir data/toy --device cpu --model resnet18 \\
        --img-size 32 --gen-device cpu --gen-model tiny --strategy realmix --gen-steps 4 \\
        --gen-resolution 32 --gen-dtype float32 --diffmix-p 0.3

``--gen-model tiny`` builds an untrained tiny diffusion model (no download) and
``realmix`` needs no personalisation; for the method itself pass a Stable Diffusion 1.5
folder or hub id, ``--gen-finetuned`` and ``--strategy diffmix``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from timm.data import create_dataset, create_loader
from timm.loss import SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from onlinemix import DiffMix, DiffMixCollate, FidelityMonitor  # onlinemix
from onlinemix.augmentation import create_ring_and_pool  # onlinemix
from onlinemix.data import FileSplit  # onlinemix
from onlinemix.generator.components import generator_model  # onlinemix
from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec  # onlinemix


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="ImageFolder root with train/<class>/ images")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefetcher", action="store_true", help="timm's prefetcher path: mix in the collate")
    # timm's Mixup/CutMix flags, same names and meaning
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--cutmix", type=float, default=0.0)
    parser.add_argument("--mixup-prob", type=float, default=1.0)
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5)
    parser.add_argument("--mixup-mode", default="batch")
    parser.add_argument("--smoothing", type=float, default=0.1)
    # onlinemix
    parser.add_argument("--diffmix-p", type=float, default=0.1, help="per-sample replacement probability")
    parser.add_argument("--diffmix-gamma", type=float, default=0.5, help="soft-label exponent γ")
    parser.add_argument("--strategy", default="diffmix",
                        help="diffmix, realmix, ... (onlinemix.plan.STRATEGIES; the paper's diff-mix spellings too)")
    parser.add_argument("--metaclass", default="object", help='what the classes are ("bird" ...)')
    parser.add_argument("--gen-device", nargs="+", default=["cuda:1"])
    parser.add_argument("--gen-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="diffusers folder or hub id; 'tiny' builds an untrained tiny model")
    parser.add_argument("--gen-finetuned", help="personalised generator folder (LoRA + learned tokens)")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--gen-resolution", type=int, default=512)
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--gen-dtype", default="float16")
    parser.add_argument("--gen-warmup", type=float, default=60.0, help="seconds to wait for a first batch")
    parser.add_argument("--ring-slots", type=int, default=256)
    return parser


def start_generator(args, dataset, work_dir: str):  # onlinemix
    """A ring at the training resolution and a generator pool translating the training images into it."""
    reader = dataset.reader
    class_names = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    references = FileSplit([path for path, _ in reader.samples], [label for _, label in reader.samples])
    spec = GeneratorSpec(model=generator_model(args.gen_model, work_dir), finetuned=args.gen_finetuned,
                         strategy=args.strategy, steps=args.gen_steps, resolution=args.gen_resolution,
                         image_size=args.img_size, batch_size=args.gen_batch_size, dtype=args.gen_dtype)
    factory = DiffusionProducerFactory(spec, references, class_names, args.metaclass)
    ring, pool = create_ring_and_pool(factory, args.gen_device, slots=args.ring_slots, image_size=args.img_size)
    pool.start().warm_up(args.batch_size, timeout=args.gen_warmup)  # a head start: the first batches find samples
    return ring, pool


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dataset_train = create_dataset("", root=args.data_dir, split="train", is_training=True)
    num_classes = len(dataset_train.reader.class_to_idx)

    # setup mixup / cutmix, as timm's train.py does
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=None, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    work_dir = tempfile.TemporaryDirectory(prefix="onlinemix-example-")  # for --gen-model tiny
    ring, pool = start_generator(args, dataset_train, work_dir.name)  # onlinemix
    try:  # from here on, stop the generator however the run ends
        diffmix_args = dict(source=ring, p=args.diffmix_p, gamma=args.diffmix_gamma)  # onlinemix
        collate_fn = mixup_fn = None
        if args.prefetcher:
            collate_fn = DiffMixCollate(**mixup_args, **diffmix_args)  # onlinemix: was FastCollateMixup(**mixup_args)
        else:
            mixup_fn = DiffMix(**mixup_args, **diffmix_args)  # onlinemix: was Mixup(**mixup_args)

        loader_train = create_loader(dataset_train, input_size=(3, args.img_size, args.img_size),
                                     batch_size=args.batch_size, is_training=True, use_prefetcher=args.prefetcher,
                                     collate_fn=collate_fn, num_workers=args.workers, device=device,
                                     persistent_workers=args.workers > 0)
        model = create_model(args.model, num_classes=num_classes).to(device)
        optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=1e-4, momentum=0.9)
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                                       warmup_epochs=0)
        train_loss_fn = SoftTargetCrossEntropy()  # as timm uses whenever mixup is active

        fidelity = FidelityMonitor()  # onlinemix: what the classifier calls the synthetic samples it trains on
        losses = []
        for epoch in range(num_epochs):
            model.train()
            for input, target in tqdm(loader_train, desc=f"epoch {epoch + 1}/{num_epochs}"):
                if not args.prefetcher:
                    input, target = input.to(device), target.to(device)
                    input, target = mixup_fn(input, target)
                output = model(input)
                loss = train_loss_fn(output, target)
                if mixup_fn is not None:  # onlinemix; the collate path replaces rows in the loader's workers
                    fidelity.update(output, mixup_fn.synthetic)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            lr_scheduler.step(epoch + 1)
    finally:
        pool.stop()  # onlinemix
        ring.close()  # onlinemix
        work_dir.cleanup()
    stats = (mixup_fn or collate_fn).stats()
    print(f"trained {len(losses)} steps, last loss {losses[-1]:.4f}, synthetic fraction "
          f"{stats['replaced_fraction']:.3f} (p = {args.diffmix_p})")
    calls = FidelityMonitor.summary(fidelity.state())
    if calls:
        print(f"the classifier called {calls['all']['target']:.2f} of the synthetic samples their target class and "
              f"{calls['all']['source']:.2f} their source class")
    return {"losses": losses, "augmentation": stats, "fidelity": calls}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
