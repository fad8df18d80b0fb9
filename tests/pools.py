import torch

from onlinemix import TensorSource


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
