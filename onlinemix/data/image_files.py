"""Image files checked once, before training, so that a bad one stops nothing mid-epoch.

``check_image_files`` reads every file the way training will, but cheaply: a PNG's chunks
and their checksums without decompressing them, a JPEG decoded at an eighth of its size
(which still reads all of its data, so a truncated file is caught), anything else decoded.
"""
from __future__ import annotations

from typing import Optional, Sequence

from PIL import Image

# Bad files named in the error; more are counted.
LISTED = 20


def image_fault(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as an image (not one PIL knows, or data that stops short), or None."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error ... for a damaged file
        return str(error) or type(error).__name__
    return None


def check_image_files(paths: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming every file of ``paths`` that ``image_fault`` refuses (``where``: what
    listed them, for the message)."""
    from tqdm import tqdm

    faults = [(path, fault) for path in tqdm(paths, desc=f"checking images in {where}", leave=False, disable=None)
              if (fault := image_fault(path)) is not None]
    if faults:
        listed = "\n".join(f"  {path}: {fault}" for path, fault in faults[:LISTED])
        more = f"\n  ... and {len(faults) - LISTED} more" if len(faults) > LISTED else ""
        raise ValueError(f"{len(faults)} of the {len(paths)} images in {where} cannot be read; remove or replace "
                         f"them, then start again:\n{listed}{more}")
