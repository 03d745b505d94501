"""Train the embedded default model (Qwen2-VL architecture) on generated shape scenes.

    .venv/bin/python -m training.train --out /tmp/stage1            # stage 1 (CPU defaults)

training/README.md has the three-stage recipe that produced the shipped weights and the
measured run times (~0.5 s per step of 32 on the 2-core CPU with one thread, ~0.23 s per
step of 64 on an H100; per-step host work, not FLOPs, bounds this tiny model on a GPU).

Deterministic: the data stream, the initial weights and every update follow ``--seed``,
so on the CPU the same seeds, thread count, machine and torch version give identical runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from training import shapes
from training.batches import COLOR_NAMES, IGNORE, Batch, BatchBuilder
from training.model_files import ModelDims, build_tokenizer, hub_state_dict, write_model_files

# The held-out monitor uses its own seed, far from the training stream's.
MONITOR_SEED = 987_654


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mmengine/assets/default_model"))
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5, help="vision auxiliary loss")
    p.add_argument("--noise-std", type=float, default=4.0, help="pixel noise on half the media")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from", type=Path, default=None, help="continue from this checkpoint's weights"
    )
    p.add_argument("--video-fraction", type=float, default=0.3, help="share of clips in the data")
    p.add_argument(
        "--caption-fraction",
        type=float,
        default=0.5,
        help="share of first turns that ask for a caption",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=500)
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_device(batch: Batch, device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.model_inputs().items()}


@torch.no_grad()
def teacher_forced_exact(model: torch.nn.Module, batch: Batch, device: str) -> list[bool]:
    """Per row: is every reply token the argmax given the right prefix? That is exactly
    "greedy decoding reproduces every reply", at the cost of one forward pass."""
    model.eval()
    logits = model(**to_device(batch, device)).logits[:, :-1].argmax(-1).cpu()
    model.train()
    target = batch.labels[:, 1:]
    trained = target != IGNORE
    return [bool(((logits[r] == target[r]) | ~trained[r]).all()) for r in range(len(target))]


def monitor_set(builder: BatchBuilder) -> tuple[list[shapes.Example], Batch]:
    examples = shapes.held_out_examples(MONITOR_SEED, num_images=64, num_videos=32, num_qa=64)
    return examples, builder.build(examples, random.Random(0))


def report(examples: list[shapes.Example], exact: list[bool]) -> str:
    groups = {"image": [], "video": [], "qa": []}
    for ex, ok in zip(examples, exact):
        key = "qa" if ex.turns[0].task == "qa" else ex.kind
        groups[key].append(ok)
    return " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in groups.items())


class TokenProbe(torch.nn.Module):
    """Training-only heads on the merged vision tokens: the shape kind, colour and motion
    each token shows. A dense signal straight into the vision tower, which otherwise
    learns shapes only through the LLM's attention (still at chance after 2,000 steps
    without it). Not saved: the shipped checkpoint is a plain Qwen2-VL."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.kind = torch.nn.Linear(hidden, len(shapes.SHAPES) + 1)
        self.color = torch.nn.Linear(hidden, len(COLOR_NAMES))
        self.motion = torch.nn.Linear(hidden, len(shapes.DIRECTIONS) + 1)
        self.captured: list[torch.Tensor] = []

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.captured.append(output)  # [merged tokens, hidden]: images first, then videos

    def loss(self, batch: Batch) -> torch.Tensor:
        feats, self.captured = torch.cat(self.captured), []
        labels = batch.vision_labels
        ce = torch.nn.functional.cross_entropy
        dev = feats.device
        return (
            ce(self.kind(feats), labels.kinds.to(dev))
            + ce(self.color(feats), labels.colors.to(dev))
            + ce(self.motion(feats), labels.motions.to(dev))
        )


def save(model: torch.nn.Module, out: Path) -> None:
    save_file(hub_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import (
        AutoConfig,
        AutoProcessor,
        AutoTokenizer,
        Qwen2VLForConditionalGeneration,
    )

    dims = ModelDims()
    tok = build_tokenizer()
    write_model_files(args.out, dims, tok)
    config = AutoConfig.from_pretrained(args.out)
    if args.init_from is None:
        model = Qwen2VLForConditionalGeneration(config)
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
    model = model.to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{n_params / 1e6:.2f}M parameters, {n_params * 4 / 2**20:.1f} MiB in float32", flush=True
    )

    builder = BatchBuilder(tok, AutoProcessor.from_pretrained(args.out))
    data_rng = random.Random(args.seed)
    builder.check_against_template(
        AutoTokenizer.from_pretrained(args.out), shapes.sample_example(random.Random(1))
    )
    mon_examples, mon_batch = monitor_set(builder)

    probe = TokenProbe(dims.hidden_size).to(args.device)
    model.model.visual.merger.register_forward_hook(probe.hook)
    params = [*model.named_parameters(), *probe.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    start = last = time.perf_counter()
    loss_sum = aux_sum = 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        examples = [
            shapes.sample_example(
                data_rng, video_fraction=args.video_fraction, caption_fraction=args.caption_fraction
            )
            for _ in range(args.batch_size)
        ]
        batch = builder.build(examples, data_rng, noise_std=args.noise_std)
        probe.captured.clear()  # drop what the held-out monitor's forward left there
        loss = model(**to_device(batch, args.device), labels=batch.labels.to(args.device)).loss
        aux = probe.loss(batch)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        loss_sum += loss.item()
        aux_sum += aux.item()
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter()
            print(
                f"step {step + 1} loss {loss_sum / args.log_every:.4f} "
                f"aux {aux_sum / args.log_every:.4f} "
                f"lr {lr_at(step, args):.2e} {(now - last) / args.log_every:.3f} s/step "
                f"elapsed {now - start:.0f}s",
                flush=True,
            )
            loss_sum, aux_sum, last = 0.0, 0.0, now
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            exact = teacher_forced_exact(model, mon_batch, args.device)
            print(f"step {step + 1} held-out exact: {report(mon_examples, exact)}", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(model, args.out)
    elapsed = time.perf_counter() - start
    stats = {"steps": args.steps, "seconds": round(elapsed), "threads": args.threads}
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
