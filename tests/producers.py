"""Cheap producers for GeneratorPool tests; module-level so spawned workers can unpickle them."""
import os
import time

import torch

from onlinemix import SampleBatch


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

        return produce


class Halving:
    """Like Counting, but drops half of each batch and says so in ``dropped``."""

    def __call__(self, device):
        produce = Counting()(device)

        class Producer:
            dropped = 0

            def __call__(self):
                batch = produce()
                Producer.dropped += 2
                return batch.select(slice(0, 2))

        return Producer()


class Failing:
    def __call__(self, device):
        raise RuntimeError(f"no generator on {device} today")


class Hanging:
    def __call__(self, device):
        def produce():
            time.sleep(3600)

        return produce


class ThreadCount:
    """Batches of 4 whose ``source`` is the worker's torch thread count."""

    def __call__(self, device):
        def produce():
            return SampleBatch(torch.ones(4, 3, 8, 8, dtype=torch.uint8), torch.full((4,), torch.get_num_threads()),
                               torch.zeros(4, dtype=torch.long), torch.full((4,), 0.5))

        return produce
