"""``onlinemix caption``: SGID's first stage, the best caption of every training image and its similarity.

A BLIP captioning model (the report's ``Salesforce/blip-image-captioning-base``) writes
``--nucleus`` captions by nucleus sampling and ``--beam`` by beam search per image; CLIP (the
report's ``openai/clip-vit-base-patch32``) scores each against its image by cosine similarity;
the best caption and its similarity s* go to the caption store (``onlinemix.generator.captions``),
which ``train.py --aug sgid --captions FILE`` reads. ``--captioner demo`` captions the demo
world offline: its own varied descriptions of each image, scored by the share of the image's
attributes they name (``demo_world.scored_caption``).

The store is rewritten after every batch, so ``--resume`` continues a stopped job; each
batch's sampling is seeded by ``(seed, its first image)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch

from .commands import check_resume_settings
from .data import check_data_options, load_splits
from .generator.captions import CaptionStore
from .options import HelpFormatter, add_data_arguments, data_options, parse_with_config

logger = logging.getLogger("onlinemix")

SETTINGS = ("captioner", "scorer", "nucleus", "beam", "top_p", "max_new_tokens", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix caption", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    add_data_arguments(p.add_argument_group("data"))
    p.add_argument("--captioner", default="Salesforce/blip-image-captioning-base",
                   help="BLIP captioning model: a folder or hub id; 'demo': the demo world's own descriptions")
    p.add_argument("--scorer", default="openai/clip-vit-base-patch32", help="CLIP model: a folder or hub id")
    p.add_argument("--nucleus", type=int, default=10, help="captions per image by nucleus sampling")
    p.add_argument("--beam", type=int, default=10, help="captions per image by beam search (as many beams)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's probability mass")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where BLIP and CLIP run")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled captions")
    p.add_argument("--resume", action="store_true", help="continue the store in --out, skipping captioned images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="the caption store to write (JSON)")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    if not args.out:
        raise ValueError("--out (the caption store's JSON file) is required.")
    check_data_options(args.data_dir, **data_options(args))
    if args.nucleus < 0 or args.beam < 0 or args.nucleus + args.beam < 1:
        raise ValueError(f"--nucleus and --beam must be >= 0 with at least one caption per image, got "
                         f"{args.nucleus} and {args.beam}.")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}.")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1.")
    if args.captioner == "demo" and args.dataset != "demo":
        raise ValueError("--captioner demo describes the demo world's images (--dataset demo); caption other data "
                         "with a BLIP model.")
    if args.resume:
        check_resume_settings(args.out, read_partial(args.out), recorded(args), otherwise="--overwrite")
    elif os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} exists; pass --resume to continue it, --overwrite to replace it, or "
                         "choose another file.")


def recorded(args) -> dict:
    """The settings a store records and a resumed job must share (the demo captioner uses no BLIP or CLIP)."""
    unused = ("scorer", "top_p", "max_new_tokens") if args.captioner == "demo" else ()
    return {**{k: getattr(args, k) for k in SETTINGS if k not in unused}, "data": data_options(args)}


def read_partial(path: str) -> dict:
    """A store this command wrote, complete or not, as JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {path!r} does not exist; start without --resume.")
    CaptionStore.load(path)  # its rows are well formed
    with open(path) as f:
        return json.load(f)


def write_store(path: str, info: dict, rows: list) -> None:
    """Write the store atomically: a stopped job leaves the previous version, never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({**info, "rows": rows}, f, indent=1)
    os.replace(partial, path)


class BlipCaptioner:
    """BLIP's candidate captions and CLIP's choice among them.

    Args:
        captioner: A ``BlipForConditionalGeneration`` and its ``BlipProcessor``, as a pair.
        scorer: A ``CLIPModel`` and its tokenizer, as a pair.
        nucleus: Captions per image by nucleus sampling.
        beam: Captions per image by beam search.
        top_p: Nucleus sampling's probability mass.
        max_new_tokens: Longest caption.
    """

    def __init__(self, captioner, scorer, *, nucleus: int = 10, beam: int = 10, top_p: float = 0.9,
                 max_new_tokens: int = 30):
        (self.blip, self.processor), (self.clip, self.tokenizer) = captioner, scorer
        self.nucleus, self.beam, self.top_p, self.max_new_tokens = nucleus, beam, top_p, max_new_tokens

    @classmethod
    def from_pretrained(cls, captioner: str, scorer: str, *, device="cpu", local_files_only=False, **kwargs):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from .generator.clip_filter import load_clip

        try:
            blip = BlipForConditionalGeneration.from_pretrained(captioner, local_files_only=local_files_only)
            processor = BlipProcessor.from_pretrained(captioner, local_files_only=local_files_only)
        except OSError as error:
            raise FileNotFoundError(f"Could not load the BLIP captioner {captioner!r} ({str(error).splitlines()[0]}); "
                                    "pass a folder holding a saved BlipForConditionalGeneration and its "
                                    "processor.") from None
        clip = load_clip(scorer, device=device, local_files_only=local_files_only)
        return cls((blip.to(device).eval(), processor), clip, **kwargs)

    @torch.no_grad()
    def candidates(self, images: list) -> list[list[str]]:
        """Per PIL image, its distinct non-empty captions: nucleus samples, then beam search's best."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.blip.device, self.blip.dtype)
        per_image = [[] for _ in images]
        # Pure nucleus sampling: transformers' generation otherwise keeps only the top 50 words as well.
        runs = ((self.nucleus, dict(do_sample=True, top_p=self.top_p, top_k=0)), (self.beam, dict(num_beams=self.beam)))
        for count, options in runs:
            if count:
                ids = self.blip.generate(pixel_values=pixels, num_return_sequences=count,
                                         max_new_tokens=self.max_new_tokens, **options)
                texts = self.processor.batch_decode(ids, skip_special_tokens=True)
                for i, text in enumerate(texts):
                    per_image[i // count].append(text.strip())
        return [list(dict.fromkeys(t for t in texts if t)) for texts in per_image]

    def __call__(self, images: list) -> list[tuple[str, float]]:
        """``(caption, similarity)`` for each PIL image: the candidate CLIP finds most similar."""
        from torchvision.transforms.functional import pil_to_tensor

        from .generator.clip_filter import clip_image_features, clip_text_features

        candidates = self.candidates(images)
        image_features = torch.cat([clip_image_features(self.clip, pil_to_tensor(image.convert("RGB"))[None] / 255)
                                    for image in images])
        chosen = []
        for i, texts in enumerate(candidates):
            if not texts:
                raise ValueError(f"The captioner wrote only empty captions for image {i} of the batch; raise "
                                 "--nucleus / --beam or --max-new-tokens.")
            similarity = clip_text_features(self.clip, self.tokenizer, texts) @ image_features[i]
            best = int(similarity.argmax())
            chosen.append((texts[best], float(similarity[best])))
        return chosen


def demo_captions(split, class_names, indices, *, count: int, seed: int) -> list[tuple[str, float]]:
    """``(caption, similarity)`` of demo images ``indices``: the best of ``count`` varied descriptions."""
    from .data.demo_world import SPECIES, scored_caption

    species = {s.name: s for s in SPECIES}
    chosen = []
    for index in indices:
        environment = split.groups[index].split("/")[1]  # groups are family/environment
        rng = np.random.default_rng([seed, index])
        scored = [scored_caption(species[class_names[split.labels[index]]], environment, rng) for _ in range(count)]
        chosen.append(max(scored, key=lambda row: row[1]))
    return chosen


def main(argv=None) -> dict:
    """``onlinemix caption``: returns the store's facts."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    result = caption(args)
    print(f"wrote the captions of {result['images']} images to {args.out}; train on them with --aug sgid "
          f"--captions {args.out}", flush=True)
    return result


def caption(args) -> dict:
    from tqdm import tqdm

    splits = load_splits(args.data_dir, **data_options(args))
    train, ids = splits.train, [str(i) for i in splits.train.image_ids()]
    info = recorded(args)
    if args.captioner == "demo":
        info["similarity"] = "demo_world.scored_caption: share of the image's attributes named, on [0.2, 0.4]"
    rows = read_partial(args.out)["rows"] if args.resume else []
    done = {row["id"] for row in rows}
    todo = [i for i, image_id in enumerate(ids) if image_id not in done]
    model = None
    if args.captioner != "demo" and todo:
        model = BlipCaptioner.from_pretrained(args.captioner, args.scorer, device=args.device,
                                              local_files_only=args.local_files_only, nucleus=args.nucleus,
                                              beam=args.beam, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="captioning", unit="image")
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        if model is None:
            chosen = demo_captions(train, splits.class_names, batch, count=args.nucleus + args.beam, seed=args.seed)
        else:
            torch.manual_seed(int(np.random.default_rng([args.seed, batch[0]]).integers(2**62)))
            chosen = model([train.image(i) for i in batch])
        rows += [{"id": ids[i], "caption": text, "similarity": round(similarity, 6)}
                 for i, (text, similarity) in zip(batch, chosen)]
        write_store(args.out, {**info, "complete": False}, rows)
        bar.update(len(batch))
    bar.close()
    write_store(args.out, {**info, "complete": True}, rows)
    similarities = np.array([row["similarity"] for row in rows])
    return {"out": args.out, "images": len(rows), "similarity_mean": float(similarities.mean()) if len(rows) else None}
