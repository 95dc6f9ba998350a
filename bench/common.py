"""What the engine benches share: ``--device`` and ``--dtype``, the machine a figure was measured on,
and a clock that waits for the device's queued work, so a CUDA time is the work's, not its launch's."""

import argparse
import os
import platform
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the engine runs (default: cuda where there is one)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="the models' weights and KV cache, the baseline's too (default: float32)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    return device, DTYPES[args.dtype]


def machine(device: torch.device, dtype: torch.dtype) -> str:
    """The device named for a figure: the GPU model and torch's CUDA, or the CPU and its threads."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or platform.machine()
        where = (f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
                 f"torch {torch.__version__}")
    return f"{where}, {str(dtype).removeprefix('torch.')}"


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
