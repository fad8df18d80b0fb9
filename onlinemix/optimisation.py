"""The classifier's optimisation as one object: timm's optimiser, a per-step cosine schedule with linear
warm-up, the fp16 loss scaler and the autocast dtype, saved and restored together."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Optimisation:
    """timm's optimiser and per-step cosine schedule, the fp16 loss scaler, and the autocast dtype."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]

    @classmethod
    def create(cls, args, model: torch.nn.Module, steps_per_epoch: int) -> "Optimisation":
        """From train.py's options (``--opt``, ``--lr``, ``--momentum``, ``--weight-decay``, ``--epochs``,
        ``--warmup-epochs`` as a share of the run when < 1, ``--amp``, ``--device``)."""
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum)
        warmup = args.warmup_epochs * args.epochs if args.warmup_epochs < 1 else args.warmup_epochs
        scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch,
                                      warmup_t=int(warmup * steps_per_epoch), warmup_lr_init=args.lr * 0.01,
                                      t_in_epochs=False)
        amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        return cls(optimizer, scheduler, torch.amp.GradScaler(torch.device(args.device).type,
                                                              enabled=args.amp == "fp16"), amp_dtype)

    def step(self, loss: torch.Tensor, update: int) -> None:
        """Backward and optimiser step; the learning rate of ``update`` (steps so far, 1-based) next."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step_update(update)

    def state_dict(self) -> dict:
        """The optimiser's, scheduler's and scaler's states, under the checkpoint keys train.py resumes from."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore what ``state_dict`` returned (a train.py checkpoint holds it)."""
        for key in ("optimizer", "scheduler", "scaler"):
            getattr(self, key).load_state_dict(checkpoint[key])
