"""Where and in which precision the inference commands (ask, serve, eval) run a checkpoint."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` with the same meaning in every inference command."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (the first GPU when there is one)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights and activations; auto: bfloat16 on a GPU, the checkpoint's own dtype on CPU",
    )
    parser.add_argument(
        "--projector-order",
        choices=("column", "row"),
        default=None,
        help="2x2 token order of an mlp_downsample checkpoint, when its configs say otherwise or nothing "
        "(docs/checkpoints.md)",
    )


def resolve_dtype(name: str, device):
    """torch dtype for `--dtype`, or None to keep the checkpoint's."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return getattr(torch, name)


def load_for_inference(
    model_dir: str, device: str = "auto", dtype: str = "auto", *, torch_device=None, projector_order=None
):
    """(model in eval mode on the device, processor) from a checkpoint directory.

    `torch_device` overrides `device` (torchrun picks each rank's GPU); `projector_order` is
    `--projector-order`."""
    from pathlib import Path

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    from longvila.devices import resolve_device
    from longvila.model.vlm import LongVILA
    from longvila.processor import LongVILAProcessor

    target = torch_device if torch_device is not None else resolve_device(device)
    model = LongVILA.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, target), projector_order=projector_order
    )
    return model.to(target).eval(), LongVILAProcessor.from_pretrained(model_dir)


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ulysses` / `--ring`: MM-SP over the processes torchrun starts."""
    parser.add_argument(
        "--ulysses", type=int, default=1, help="Ulysses degree under torchrun (ulysses x ring = world size)"
    )
    parser.add_argument("--ring", type=int, default=1, help="ring degree under torchrun")


def sequence_parallel_from_args(args: argparse.Namespace, command: str):
    """(SequenceParallel or None, device) for `--ulysses` x `--ring`.

    Under torchrun the whole world is one SP group of that size, each rank on the GPU of its
    LOCAL_RANK (or the CPU, gloo); a single process may only ask for degree 1.
    """
    import os

    if args.ulysses < 1 or args.ring < 1:
        raise ValueError(f"--ulysses and --ring must be >= 1, got {args.ulysses} and {args.ring}")
    from longvila.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    degree = args.ulysses * args.ring
    if degree != world:
        raise ValueError(
            f"--ulysses {args.ulysses} x --ring {args.ring} = {degree} must equal the number of processes "
            f"({world}; start {degree} with `torchrun --nproc-per-node {degree} -m longvila.cli {command} ...`)"
        )
    if world == 1:
        return None, resolve_device(args.device)
    from longvila.parallel import init_sp
    from longvila.parallel.launch import setup_distributed

    kind = "auto" if args.device == "auto" else resolve_device(args.device).type
    info = setup_distributed(device=kind)
    return init_sp(ulysses=args.ulysses, ring=args.ring), info.device


def report_from_sp_rank0(command: str, errors: tuple[type[BaseException], ...], work):
    """Run `work() -> (sp or None, result)` the way every SP-capable command does: on one of `errors`, print
    `longvila COMMAND: error: ...` and give exit code 1; tear the process group down either way. Returns
    (exit code, result), the result None except on the rank that reports (SP rank 0, or the only one)."""
    import sys

    from longvila.parallel.launch import teardown_distributed

    try:
        sp, result = work()
    except errors as exc:
        print(f"longvila {command}: error: {exc}", file=sys.stderr)
        return 1, None
    finally:
        teardown_distributed()
    if sp is not None and sp.sp_rank != 0:
        return 0, None  # every rank computed the same result; SP rank 0 reports it
    return 0, result
