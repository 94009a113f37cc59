"""Export a frozen encoder's network (after :meth:`Encoder.preprocess`) to ONNX and run it
with onnxruntime.

On a Jetson the same file runs through the TensorRT or CUDA execution providers; which
providers and with which options is configuration (:class:`OnnxRuntimeConfig`), e.g.::

    OnnxRuntimeConfig(
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                   "CPUExecutionProvider"),
        provider_options={
            "TensorrtExecutionProvider": {"trt_fp16_enable": True,
                                          "trt_engine_cache_enable": True,
                                          "trt_engine_cache_path": "/var/cache/mpnp/trt"},
            "CUDAExecutionProvider": {"device_id": 0}})
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoders.base import Encoder
from mpnp.files import atomic_write
from scenes.sample import Frame

log = logging.getLogger(__name__)

INPUT_NAME = "inputs"
OUTPUT_NAME = "tokens"
DEFAULT_OPSET = 17


@dataclass
class OnnxRuntimeConfig:
    """Which onnxruntime execution providers to use, in order of preference.

    Attributes:
        providers: provider names (``onnxruntime.get_available_providers()`` lists them).
        provider_options: options per provider name (e.g. TensorRT fp16, engine cache).
        intra_op_threads: CPU threads for one run (0: onnxruntime's default).
        require_all: raise when a listed provider is unavailable instead of skipping it.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: dict[str, dict] = field(default_factory=dict)
    intra_op_threads: int = 0
    require_all: bool = False

    def __post_init__(self) -> None:
        self.providers = tuple(self.providers)
        if not self.providers:
            raise ValueError("OnnxRuntimeConfig.providers must name at least one provider")
        extra = sorted(set(self.provider_options) - set(self.providers))
        if extra:
            raise ValueError(f"OnnxRuntimeConfig.provider_options given for providers not in "
                             f"providers: {extra}")
        if self.intra_op_threads < 0:
            raise ValueError("OnnxRuntimeConfig.intra_op_threads must be >= 0")


def export_onnx(encoder: Encoder, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET,
                batch: int = 2) -> Path:
    """Write ``encoder.forward`` as an ONNX graph with a dynamic batch axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    example = encoder.example_input(batch).to(encoder.device)

    def write(tmp: Path) -> None:
        # torch's fused multi-head-attention kernel (taken in eval mode, e.g. by the object
        # slots' decoder layers) has no ONNX symbolic: export the plain operations instead.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(encoder, (example,), str(tmp), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"},
                                                OUTPUT_NAME: {0: "batch"}})
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    atomic_write(path, write)
    log.info("exported %s to %s", encoder.kind, path)
    return path


def _providers(config: OnnxRuntimeConfig) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    for name in config.providers:
        if name not in available:
            if config.require_all:
                raise ValueError(f"onnxruntime provider {name} is not available here "
                                 f"(available: {', '.join(available)}); install "
                                 "onnxruntime-gpu for CUDA/TensorRT")
            log.warning("onnxruntime provider %s is not available; skipping it", name)
            continue
        options = config.provider_options.get(name)
        chosen.append((name, options) if options else name)
    if not chosen:
        raise ValueError(f"none of the providers {list(config.providers)} is available "
                         f"(available: {', '.join(available)})")
    return chosen


class OnnxEncoder:
    """An exported encoder run by onnxruntime; ``encode`` matches :meth:`Encoder.encode`.

    Args:
        path: the ``.onnx`` file.
        preprocess_with: the (torch) encoder whose ``preprocess`` prepares inputs; only its
            numpy/torch preprocessing runs, not its network.
        config: execution providers.
    """

    def __init__(self, path: str | os.PathLike[str], preprocess_with: Encoder | None = None,
                 config: OnnxRuntimeConfig | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist (write it with "
                                    "`mpnp encoders export`)")
        self.config = config or OnnxRuntimeConfig()
        options = ort.SessionOptions()
        if self.config.intra_op_threads:
            options.intra_op_num_threads = self.config.intra_op_threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=_providers(self.config))
        except Exception as exc:  # onnxruntime raises its own exception types
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"onnxruntime cannot load {path} ({exc})") from exc
        self.path = path
        self.preprocess_with = preprocess_with

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Network only: model input (as from ``preprocess``) -> tokens ``(B, T, D)``."""
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().numpy()
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs.astype(np.float32)})[0]

    def encode(self, frames: Sequence[Frame]) -> torch.Tensor:
        if self.preprocess_with is None:
            raise ValueError("OnnxEncoder.encode needs preprocess_with=<the torch encoder>")
        return torch.from_numpy(self.run(self.preprocess_with.preprocess(frames)))
