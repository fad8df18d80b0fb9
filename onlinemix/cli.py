"""The ``onlinemix`` command.

``onlinemix finetune ...`` personalises a generator (``onlinemix.finetune``);
``onlinemix pretrain-demo ...`` rebuilds the demo generator (``onlinemix.demo_model``);
``onlinemix invert ...`` learns a condition per training image (``onlinemix.invert``);
``onlinemix caption ...`` captions every training image for SGID (``onlinemix.caption``);
``onlinemix generate ...`` makes a synthetic set offline on a Ray cluster (``onlinemix.generate``);
``onlinemix distill ...`` distils a few-step acceleration LoRA from a personalised generator (``onlinemix.distill``).
"""
from __future__ import annotations

import sys


# What a user's input or machine can cause: said in one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError)

COMMANDS = {
    "finetune": "personalise a generator: textual inversion + LoRA (Diff-Mix's first stage)",
    "pretrain-demo": "pretrain the tiny demo generator on the demo world's generic corpus",
    "invert": "learn one condition per training image (Diffusion Inversion's first stage)",
    "caption": "the best caption of every training image and its CLIP similarity (SGID's first stage)",
    "generate": "a synthetic set made offline on a Ray cluster, in the Diff-Mix layout, with a manifest",
    "distill": "a few-step acceleration LoRA distilled from a personalised generator, for --gen-accelerator",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        import difflib

        usage = "\n".join(f"  {name:14s} {text}" for name, text in COMMANDS.items())
        unknown = ""
        if argv and argv[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            unknown = f"error: unknown command {argv[0]!r}{hint}\n\n"
        sys.exit(f"{unknown}usage: onlinemix COMMAND [options]\n\ncommands:\n{usage}\n\n"
                 "`onlinemix COMMAND --help` lists a command's options.")
    try:
        if argv[0] == "finetune":
            from .finetune import main as finetune

            finetune(argv[1:])
        elif argv[0] == "invert":
            from .invert import main as invert

            invert(argv[1:])
        elif argv[0] == "caption":
            from .caption import main as caption

            caption(argv[1:])
        elif argv[0] == "generate":
            from .generate import main as generate

            generate(argv[1:])
        elif argv[0] == "distill":
            from .distill import main as distill

            distill(argv[1:])
        else:
            from .demo_model import main as pretrain_demo

            pretrain_demo(argv[1:])
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
