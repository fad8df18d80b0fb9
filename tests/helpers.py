"""Helpers shared by several test files: in-memory references and pools, cheap producers, a tiny CLIP.

Producers and their factories are module-level so that spawned pool workers can unpickle them.
"""
import os
import time
from typing import Sequence

import torch

from onlinemix import SampleBatch, TensorSource


class TensorImages:
    """Reference images held in memory: uint8 ``[N, 3, H, W]`` and their labels (a split's interface)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) != len(labels):
            raise ValueError("TensorImages needs uint8 images [N, 3, H, W] and N labels.")
        self.images, self.labels = images, [int(y) for y in labels]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


def solid_pool(num_classes: int, size: int = 8, count: int = 50, seed: int = 1) -> TensorSource:
    """A pool whose every image is one flat colour that encodes its pool index.

    Pixel value ``200 + i`` marks pool sample ``i`` (``count <= 56``); real test images use
    values below 200, so a synthetic image can be recognised in a batch.
    """
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(count)
    images = (200 + index).to(torch.uint8).view(-1, 1, 1, 1).expand(count, 3, size, size).contiguous()
    source = torch.randint(0, num_classes, (count,), generator=g)
    target = torch.randint(0, num_classes, (count,), generator=g)
    strength = torch.tensor([0.5, 0.7, 0.9])[torch.randint(0, 3, (count,), generator=g)]
    return TensorSource(images, source, target, strength)


def tiny_clip(seed: int = 0):
    """A small CLIP model and tokenizer built in code."""
    from transformers import CLIPConfig, CLIPModel

    from onlinemix.generator.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), tokenizer


def save_tiny_blip(folder, seed: int = 0, extra_words: int = 0) -> str:
    """A small BLIP captioner (random weights, a word-level vocabulary of 18 words plus ``extra_words``
    made-up ones) and its processor, saved to ``folder``."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = "a the bird photo of on with red blue green water land wings head small sitting branch".split()
    words += [f"word{k}" for k in range(extra_words)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words, ".", ","]) + "\n")
    tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(seed)
    special = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                   eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32, **special),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


class FunctionProducer:
    """A ``Producer`` around a function; ``drop`` samples of each batch are cut and counted in ``dropped``."""

    def __init__(self, produce, drop: int = 0):
        self.produce, self.drop, self.dropped = produce, drop, 0

    def __call__(self) -> SampleBatch:
        batch = self.produce()
        if not self.drop:
            return batch
        self.dropped += self.drop
        return batch.select(slice(0, len(batch) - self.drop))


class Counting:
    """Batches of 4 whose every byte is a running value; ``source`` holds the worker's pid % 7."""

    def __init__(self, size=8, delay=0.0):
        self.size, self.delay = size, delay

    def __call__(self, device):
        state = {"value": 0}

        def produce():
            time.sleep(self.delay)
            values = [(state["value"] + k) % 200 + 1 for k in range(4)]
            state["value"] += 4
            images = torch.tensor(values, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, self.size, self.size)
            return SampleBatch(images.contiguous(), torch.full((4,), os.getpid() % 7), torch.zeros(4, dtype=torch.long),
                               torch.full((4,), 0.5))

        return FunctionProducer(produce)


class DrawsABar(Counting):
    """Like Counting, after drawing a tqdm progress bar as model loading does."""

    def __call__(self, device):
        from tqdm import tqdm

        for _ in tqdm(range(2), desc="loading"):
            pass
        return super().__call__(device)


class DeliversThenCrashes:
    """Like Counting, but each process delivers one batch, then its producer raises."""

    def __call__(self, device):
        counting, calls = Counting()(device), []

        def produce():
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("the generator broke after one batch")
            return counting()

        return FunctionProducer(produce)


class Halving:
    """Like Counting, but drops half of each batch and says so in ``dropped``."""

    def __call__(self, device):
        return FunctionProducer(Counting()(device), drop=2)


class Failing:
    def __call__(self, device):
        raise RuntimeError(f"no generator on {device} today")


class Hanging:
    def __call__(self, device):
        def produce():
            time.sleep(3600)

        return FunctionProducer(produce)


class ThreadCount:
    """Batches of 4 whose ``source`` is the worker's torch thread count."""

    def __call__(self, device):
        def produce():
            return SampleBatch(torch.ones(4, 3, 8, 8, dtype=torch.uint8), torch.full((4,), torch.get_num_threads()),
                               torch.zeros(4, dtype=torch.long), torch.full((4,), 0.5))

        return FunctionProducer(produce)


def held_out(grid, drawn) -> list:
    """The timesteps of ``grid`` that no training step drew."""
    return [t for t in grid if t not in drawn]


def tiny_study_config(folder) -> str:
    """A one-epoch demo-world config at 32 px with the untrained demo generator, for the study scripts' tests;
    written to ``folder/study.yaml``, whose path is returned."""
    import yaml

    config = dict(dataset="demo", data_dir=os.path.join(folder, "world"), metaclass="bird", model="resnet18",
                  img_size=32, batch_size=16, epochs=1, workers=0, device="cpu", gen_device=["cpu"], gen_model="demo",
                  gen_steps=4, gen_resolution=32, gen_batch_size=4, gen_dtype="float32", ring_slots=16, p=0.5)
    path = os.path.join(folder, "study.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path
