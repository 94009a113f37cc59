"""A deterministic fake model backend, for the tests and the reliability benchmark's fuzz
suites (no torch, no model: answers spell out the question, the modality set, the serving
state's version and the frame id, so a caller can see exactly which state and frame answered).
It composes too (:class:`daemon.backend.ComposingBackend`): a composed candidate validates at
``composed_accuracy``; states written by a toy of another ``llm`` are refused.

Usable as ``model.backend = "daemon.testing:make_toy_backend"`` in a daemon config.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from daemon.backend import AdaptProgress, ComposeError, ComposeInput
from mpnp.cost_model import CostModel
from scenes.sample import CAMERA_VIEWS, Frame


class ToyBackend:
    def __init__(
        self,
        adapted_accuracy: float = 0.8,
        serving_accuracy: float = 0.5,
        step_delay_s: float = 0.0,
        fail_step_at: int | None = None,
        num_layers: int = 8,
        state_bytes: int = 16,
        camera_shape: tuple[int, int] | None = None,
        composed_accuracy: float = 0.7,
        llm: str = "toy",
        teacher_confidence: float = 0.9,
    ) -> None:
        self.adapted_accuracy = adapted_accuracy
        self.serving_accuracy = serving_accuracy
        self.step_delay_s = step_delay_s
        self.fail_step_at = fail_step_at
        self.num_layers = num_layers
        self.state_bytes = state_bytes
        # When set, camera frames of another (H, W) are refused at ingest like a real
        # encoder's fixed input size (``check_frame``).
        self.camera_shape = tuple(camera_shape) if camera_shape else None
        self.composed_accuracy = composed_accuracy
        self.llm = llm  # written into every saved state; composition needs one LLM
        self.teacher_confidence = teacher_confidence
        self.version = 0
        self.candidate: dict | None = None
        # Live samples (daemon.samples.LiveSamples), when the engine hands them over; the
        # data context of a modality set is the engine's policy's.
        self.live = None
        self.data_context = lambda modalities: None
        #: What the last run trained and validated on: source, counts, sources of samples.
        self.data: dict | None = None
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def answer(self, questions, frames, modalities):
        self.calls.append(("answer", len(questions)))
        return [
            f"{q}|{'+'.join(sorted(modalities))}|v{self.version}|{f.frame_id if f else None}"
            for q, f in zip(questions, frames or [None] * len(questions))
        ]

    def answer_with_confidence(self, questions, frames, modalities):
        """Answers and a fixed confidence (``teacher_confidence``) per answer."""
        return (self.answer(questions, frames, modalities),
                [self.teacher_confidence] * len(questions))

    def use_data_context(self, data_context):
        self.data_context = data_context

    def use_live_samples(self, live):
        self.live = live

    def _choose_data(self, modalities) -> dict:
        context = self.data_context(frozenset(modalities)) or "day"
        split = self.live.training_split(context) if self.live is not None else None
        if split is None:
            return {"source": "world", "context": context}
        sources = sorted({item.meta["source"] for item in split.train + split.val})
        return {"source": self.live.mode, "context": context, "train": len(split.train),
                "val": len(split.val), "frames": len(split.frames), "sample_sources": sources}

    def start_adaptation(self, modalities, n_blocks, steps, batch_size):
        self.calls.append(("start", tuple(sorted(modalities)), n_blocks, steps))
        self.data = self._choose_data(modalities)
        self.calls.append(("data", self.data["source"]))
        self.candidate = {"modalities": modalities, "n": n_blocks, "steps": steps, "done": 0,
                          "from_version": self.version}

    def adaptation_step(self):
        c = self.candidate
        if c is None or c["done"] >= c["steps"]:
            return None
        if self.fail_step_at is not None and c["done"] + 1 == self.fail_step_at:
            raise RuntimeError("toy step failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        c["done"] += 1
        self.calls.append(("step", c["done"]))
        return AdaptProgress(c["done"], c["steps"], loss=1.0 / c["done"], samples=16 * c["done"])

    def set_total_steps(self, steps):
        self.calls.append(("total", steps))
        if self.candidate is not None:
            self.candidate["steps"] = max(steps, self.candidate["done"])

    def validation_accuracy(self, which):
        if which == "adapted":
            composed = self.candidate is not None and "composed_from" in self.candidate
            return self.composed_accuracy if composed else self.adapted_accuracy
        return self.serving_accuracy

    def compose_candidate(self, inputs: list[ComposeInput], modalities, method, max_evals):
        from safetensors import safe_open

        if method not in ("auto", "naive", "naive-ab", "damc"):
            raise ComposeError(f"unknown composition method {method!r}")
        versions = []
        for item in inputs:
            with safe_open(str(item.path), framework="numpy") as fh:
                llm = (fh.metadata() or {}).get("llm", "toy")
                versions.append(int(fh.get_tensor("version")[0]))
            if llm != self.llm:
                raise ComposeError(f"{item.name} was made for another LLM ({llm!r}, serving "
                                   f"{self.llm!r}); only states of the same LLM compose")
        used = "damc" if method == "auto" else method
        lambdas = [1.0 / len(inputs)] * len(inputs) if used == "damc" else None
        self.calls.append(("compose", tuple(sorted(modalities)), used, tuple(versions)))
        self.candidate = {"modalities": modalities, "n": self.num_layers, "steps": 0, "done": 0,
                          "composed_from": versions}
        return {"method": used, "lambdas": lambdas, "num_blocks": self.num_layers,
                "compose_s": 0.0, "search": {"evaluations": 1} if lambdas else None}

    def commit_adapted(self):
        self.calls.append(("commit",))
        self.version += 1
        self.candidate = None

    def discard_adapted(self):
        self.calls.append(("discard",))
        self.candidate = None

    def save_state(self, path: Path):
        from safetensors.numpy import save_file

        # The payload makes a save take long enough for a SIGKILL to land inside it.
        payload = np.full(max(self.state_bytes // 4, 1), self.version, np.float32)
        save_file({"version": np.full(4, self.version, np.int64), "payload": payload}, str(path),
                  metadata={"llm": self.llm})

    def load_state(self, path: Path):
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        version = int(tensors["version"][0])
        if not (tensors["payload"] == version).all():
            raise ValueError(f"{path}: payload does not match version {version}")
        self.version = version
        self.calls.append(("load", self.version))

    def cost_model(self):
        return CostModel(forward=1e6, dy_llm=2e6, dw_aligners=1e4, dy_emb=1e4,
                         num_layers=self.num_layers)

    def check_frame(self, sensor, arrays):
        if sensor != "camera" or self.camera_shape is None:
            return None
        shape = next(iter(arrays.values())).shape[:2]
        return None if shape == self.camera_shape else f"views {shape}, need {self.camera_shape}"


def make_toy_backend(**options) -> ToyBackend:
    return ToyBackend(**options)


def toy_frame(frame_id: str = "f0", timestamp: float = 0.0, light: float = 1.0,
              size: tuple[int, int] = (8, 12), points: int = 16) -> Frame:
    h, w = size
    level = int(round(light * 200))
    cameras = {view: np.full((h, w, 3), level, np.uint8) for view in CAMERA_VIEWS}
    lidar = np.arange(points * 4, dtype=np.float32).reshape(points, 4)
    return Frame.from_rig(frame_id, "toy", timestamp, light, cameras, lidar)
