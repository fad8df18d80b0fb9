"""SGID's costs and choices, measured: the caption store's cost per image, where prompt weights act.

1. **Caption cost.** ``onlinemix caption``'s work per image — BLIP writes ``--nucleus`` captions by
   nucleus sampling and ``--beam`` by beam search, CLIP scores them — timed with models of the
   report's sizes (BLIP base: ViT-B/16 at 384 px and a 12-layer BERT decoder; CLIP ViT-B/32)
   built from their default configs with random weights, since nothing can be downloaded here.
   Random weights stop at no particular length, so every caption is held at ``--tokens`` tokens
   (BLIP base's captions run about 10 words); the time per token is the model's, whatever its
   weights. Images are timed after one warm-up batch.
2. **Where prompt weights act.** On the shipped demo text encoder: a label weighted 1.5 and a
   caption 0.9 applied to the token embeddings, against ``Sampler.embed``'s weighting of the
   encoder's outputs — how much of the weight reaches what the U-Net reads.
3. **The demo caption store.** The similarities and guidance scales SGID runs with on the demo.

    python benchmarks/bench_caption.py                       # CPU, 4 images, 10 + 10 captions each
    python benchmarks/bench_caption.py --device cuda --images 32 --batch-size 8 --parts cost

Writes ``benchmarks/results/caption_<device>.json``.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from report import RESULTS, machine, sync, write_report

from onlinemix.caption import BlipCaptioner, demo_captions
from onlinemix.generator.captions import CAPTION_WEIGHTS, captioned_guidance, captioned_prompt
from onlinemix.generator.components import load_components
from onlinemix.generator.sampler import weighted_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_models(folder: str, size: str) -> None:
    """BLIP and CLIP with random weights, saved to ``folder``: ``report``, BLIP base and CLIP ViT-B/32
    (their default configs); ``tiny``, two layers of width 32 (the GPU suite's dry run)."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, CLIPConfig, CLIPModel)

    from onlinemix.generator.tiny import tiny_tokenizer

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text, vision = ({}, {}) if size == "report" else (dict(encoder_hidden_size=32, **tiny),
                                                      dict(image_size=32, patch_size=8, **tiny))
    words = BlipConfig().text_config.vocab_size - 6 if size == "report" else 58
    blip = os.path.join(folder, "blip")
    os.makedirs(blip)
    with open(os.path.join(blip, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(words)), "[DEC]"]))
    tokenizer = BertTokenizer(os.path.join(blip, "vocab.txt"), bos_token="[DEC]")
    special = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                   eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(text_config=dict(vocab_size=len(tokenizer), **special, **text), vision_config=vision)
    BlipForConditionalGeneration(config).save_pretrained(blip)
    pixels = config.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": pixels, "width": pixels}),
                  tokenizer=tokenizer).save_pretrained(blip)
    clip_config = CLIPConfig() if size == "report" else CLIPConfig(text_config=dict(vocab_size=600, **tiny),
                                                                   vision_config=vision, projection_dim=16)
    CLIPModel(clip_config).save_pretrained(os.path.join(folder, "clip"))
    tiny_tokenizer(clip_config.text_config.vocab_size).save_pretrained(os.path.join(folder, "clip"))


def caption_cost(args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        save_models(folder, args.size)
        captioner = BlipCaptioner.from_pretrained(os.path.join(folder, "blip"), os.path.join(folder, "clip"),
                                                  device=args.device, nucleus=args.nucleus, beam=args.beam,
                                                  max_new_tokens=args.tokens)
    captioner.blip.text_decoder.generation_config.min_new_tokens = args.tokens  # every caption args.tokens long
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (500, 375, 3), dtype=np.uint8)) for _ in range(args.images)]
    device = torch.device(args.device)
    captioner(images[:args.batch_size])  # warm-up
    sync(device)
    start = time.perf_counter()
    for first in range(0, len(images), args.batch_size):
        captioner(images[first:first + args.batch_size])
    sync(device)
    seconds = (time.perf_counter() - start) / len(images)
    return {"seconds_per_image": round(seconds, 3), "hours_for_6000_images": round(seconds * 6000 / 3600, 2),
            "images": args.images, "batch_size": args.batch_size, "captions_per_image": args.nucleus + args.beam,
            "tokens_per_caption": args.tokens, "device": args.device, "models": args.size}


@torch.no_grad()
def weighting() -> dict:
    """Output-norm ratio and relative change of the weighted tokens' encoder outputs, weights on the inputs."""
    components = load_components("demo")
    encoder = components.text_encoder
    fragments = captioned_prompt("a round brown bird with crimson wings and a black head, on land", "ember finch")
    ids, weights = weighted_tokens(components.tokenizer, fragments)
    ids, weights = torch.tensor([ids]), torch.tensor([weights])
    plain = encoder(ids)[0][0]
    hook = encoder.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output * weights[..., None])
    on_inputs = encoder(ids)[0][0]
    hook.remove()
    out = {}
    for name, weight in zip(("caption", "label"), CAPTION_WEIGHTS):
        rows = weights[0] == weight
        norm = (on_inputs[rows].norm(dim=-1) / plain[rows].norm(dim=-1)).mean()
        change = ((on_inputs[rows] - plain[rows]).norm(dim=-1) / plain[rows].norm(dim=-1)).mean()
        out[name] = {"weight": weight, "tokens": int(rows.sum()), "on_inputs_output_norm_ratio": round(float(norm), 4),
                     "on_inputs_relative_change": round(float(change), 4),
                     "on_outputs_relative_change": round(abs(weight - 1), 4)}
    return out


def demo_store() -> dict:
    """SGID's similarities and guidance on the demo world's training images (20 candidates each, seed 0)."""
    from onlinemix.data import load_splits

    splits = load_splits(os.path.join(ROOT, "data", "demo"), dataset="demo")
    chosen = demo_captions(splits.train, splits.class_names, range(len(splits.train)), count=20, seed=0)
    similarities = np.array([s for _, s in chosen])
    guidance = captioned_guidance(similarities, 7.5)
    return {"images": len(chosen),
            "similarity_counts": {str(k): v for k, v in sorted(collections.Counter(similarities.round(4)).items())},
            "guidance_counts": {str(k): v for k, v in sorted(collections.Counter(guidance.round(3)).items())},
            "caption_words_mean": float(np.mean([len(t.split()) for t, _ in chosen]))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4, help="images timed (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--nucleus", type=int, default=10)
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--tokens", type=int, default=12, help="tokens per caption")
    p.add_argument("--size", choices=["report", "tiny"], default="report",
                   help="the report's model sizes, or tiny ones (a dry run of the plumbing)")
    p.add_argument("--parts", nargs="+", choices=["cost", "weighting", "demo_store"],
                   default=["cost", "weighting", "demo_store"], help="what to measure")
    p.add_argument("--out")
    args = p.parse_args(argv)
    out = args.out or os.path.join(RESULTS, f"caption_{args.device.split(':')[0]}.json")
    torch.manual_seed(0)
    parts = {"cost": lambda: caption_cost(args), "weighting": weighting, "demo_store": demo_store}
    result = {name: parts[name]() for name in args.parts}
    print(result)
    return write_report("caption", out, vars(args), [result], machine=machine(torch.device(args.device)))


if __name__ == "__main__":
    main()
