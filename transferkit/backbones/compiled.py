"""Frozen text encoders compiled by OpenVINO, for feature extraction on a CPU.

Under torch, a quarter of a small encoder's CPU time is spent outside its matrix products:
attention's softmax, GELU, layer norm and the copies between them (26 % of MiniLM's encode
time in bf16, ``bench/extract.py``'s profile). OpenVINO fuses them, keeps softmax and layer
norm in fp32 with bf16 matrix products, and runs two inference streams at once.

It is an implementation detail of ``extract_features``, used only where it pays: a CPU, bf16
precision and at least ``MIN_TEXTS`` texts (converting MiniLM takes about 1.5 s). Before use
the compiled encoder is checked against the torch module on a batch of another shape than
the one it was traced with; a failed conversion or check falls back to torch with one
warning. ``TRANSFERKIT_EXTRACT_RUNTIME=torch`` turns it off, ``=openvino`` asks for it
whatever the size.

OpenVINO's Python package sends a usage event to Google Analytics when it is imported,
unless a consent file in the user's home says no. transferkit does not phone home: the
telemetry module is hidden before the import, so OpenVINO falls back to its own no-op stub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ENV = "TRANSFERKIT_EXTRACT_RUNTIME"
RUNTIMES = ("auto", "torch", "openvino")
# Below this many texts the conversion costs more than the faster encoding saves.
MIN_TEXTS = 16_384
# The compiled encoder must agree with the torch module this closely on the check batch.
MIN_COSINE = 0.999

Batch = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def runtime_choice() -> str:
    """``TRANSFERKIT_EXTRACT_RUNTIME`` (unset: 'auto'), checked."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in RUNTIMES:
        raise ValueError(f"{ENV}={choice!r}: use one of {', '.join(RUNTIMES)} (unset: auto)")
    return choice


def wanted(device: torch.device, precision: str, texts: int) -> bool:
    """Whether extraction of ``texts`` texts should run compiled by OpenVINO."""
    choice = runtime_choice()
    if choice == "torch" or device.type != "cpu":
        return False
    if importlib.util.find_spec("openvino") is None:
        if choice == "openvino":
            raise RuntimeError(
                f"{ENV}=openvino, but OpenVINO is not installed: pip install openvino"
            )
        return False
    return choice == "openvino" or (precision == "bf16" and texts >= MIN_TEXTS)


def _openvino() -> Any:
    if "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # no usage events
    import openvino

    return openvino


class CompiledEncoder:
    """An encoder compiled by OpenVINO: padded token ids and mask → one vector per text.

    ``run_batches`` keeps every inference stream busy and yields each batch's rows when they
    are ready, in completion order, each with its batch's row indices.
    """

    def __init__(self, compiled: Any, requests: int) -> None:
        self.compiled = compiled
        self.requests = max(1, requests)

    def run_batches(self, batches: Iterable[Batch]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ov = _openvino()
        done: queue.SimpleQueue[tuple[np.ndarray, np.ndarray]] = queue.SimpleQueue()
        pending = ov.AsyncInferQueue(self.compiled, self.requests)

        def finished(request: Any, index: np.ndarray) -> None:
            done.put((index, np.array(request.get_output_tensor(0).data, dtype=np.float32)))

        pending.set_callback(finished)
        for index, input_ids, mask in batches:
            pending.start_async({0: input_ids.numpy(), 1: mask.numpy()}, index)
            while not done.empty():
                yield done.get()
        pending.wait_all()
        while not done.empty():
            yield done.get()

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = self.compiled({0: input_ids.numpy(), 1: mask.numpy()})[0]
        return torch.from_numpy(np.array(rows, dtype=np.float32))


def _convert(encoder: nn.Module, precision: str) -> CompiledEncoder:
    ov = _openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    example = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        decoder = TorchScriptPythonDecoder(encoder, example_input=(example, example))
    frontend = FrontEndManager().load_by_framework("pytorch")
    model = frontend.convert(frontend.load(decoder))
    model.reshape({0: ov.PartialShape([-1, -1]), 1: ov.PartialShape([-1, -1])})
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        },
    )
    return CompiledEncoder(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))


def agreement(encoder: nn.Module, compiled: CompiledEncoder, check: Batch) -> float:
    """Lowest cosine between the torch module's and the compiled encoder's vectors of the
    check batch (padded as extraction pads, to widths other than the traced one)."""
    _, input_ids, mask = check
    with torch.inference_mode():
        expected = encoder(input_ids, mask).float()
    got = compiled(input_ids, mask)
    return float(nn.functional.cosine_similarity(expected, got, dim=-1).min())


def _reason(error: Exception) -> str:
    """One line for why a conversion failed: OpenVINO's summary of the operations it could
    not convert when it gives one, else the error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("-- Conversion is failed for:")]
    return (failed or lines or [type(error).__name__])[0].removeprefix("-- ")[:200]


def compile_encoder(encoder: nn.Module, check: Batch, precision: str) -> CompiledEncoder | None:
    """``encoder`` (fp32, eval mode) compiled by OpenVINO, or None (logged) when it cannot be
    converted or its vectors of the ``check`` batch disagree with the torch module's."""
    name = type(encoder).__name__
    try:
        compiled = _convert(encoder, precision)
        cosine = agreement(encoder, compiled, check)
    except Exception as error:  # any failure means: extract with torch
        reason = _reason(error)
        log.warning("OpenVINO could not compile %s (%s): extracting with torch", name, reason)
        return None
    if not cosine >= MIN_COSINE:
        log.warning(
            "OpenVINO's %s disagrees with torch (cosine %.5f < %s): extracting with torch",
            name,
            cosine,
            MIN_COSINE,
        )
        return None
    log.info(
        "extracting with %s compiled by OpenVINO (%s, cosine to torch %.5f)",
        name,
        precision,
        cosine,
    )
    return compiled
