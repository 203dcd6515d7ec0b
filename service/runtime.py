"""An onnxruntime session for one student version, loaded only from verified bytes.

The session runs inline on the event loop. Measured on the 2-core dev machine (shared with a
training job, so on the high side): one run of a 64->256->256->10 MLP (the digits student class)
costs ~38 us at batch 1 and ~190 us at batch 32, while the same run through `asyncio.to_thread`
costs ~174 us at batch 1 (thread hop, future, loop wake-up). A thread would cost more than the
work it moves, and both are far under the ~1 ms at which STYLE.md says a run must leave the loop.
A heavier student must revisit this (docs/configuration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kdgate.service.cards import ModelCard, load_card, verify_model_file
from kdgate.service.datatypes import NUMPY_DTYPES, ORT_TYPES
from kdgate.service.tensors import Signature


class SignatureMismatch(Exception):
    """The ONNX graph's inputs/outputs are not the ones its card declares."""


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a small model served by one worker per container.

    One intra-op thread: a tiny MLP gains nothing from a thread pool, and spinning pool threads
    steal the core the event loop needs. Sequential execution: the graph is a chain.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning keeps an idle pool thread busy-waiting on the core the event loop runs on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class StudentSession:
    """One student version: its card, signature and onnxruntime session."""

    def __init__(self, card: ModelCard, model_bytes: bytes, options: ort.SessionOptions) -> None:
        self.card = card
        self.signature = Signature.from_card(card)
        self._session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._check_signature()
        self._output_names = list(self.signature.outputs)
        # The binding under `InferenceSession.run`: the wrapper re-checks input names (the
        # codecs already did), OrtValue ownership and WebGPU graph capture, ~6 us of a ~17 us
        # batch-1 run here. Falls back to the public method if a release renames `_sess`.
        self._run = getattr(self._session, "_sess", self._session).run

    @classmethod
    def from_card(
        cls, card_path: Path | str, *, intra_op_threads: int = 1, inter_op_threads: int = 1
    ) -> StudentSession:
        """Load the card, verify the model file's sha256 and build the session from those bytes."""
        card = load_card(card_path)
        model_bytes = verify_model_file(card_path, card)
        return cls(card, model_bytes, session_options(intra_op_threads, inter_op_threads))

    def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model on validated inputs; returns the outputs by name."""
        results = self._run(self._output_names, inputs, None)
        # Not strict: onnxruntime returns one result per name asked for; checking costs ~1 us,
        # and even `strict=False` spelled out costs a keyword parse.
        return dict(zip(self._output_names, results))  # noqa: B905

    def warm_up(self, runs: int) -> None:
        """Run `runs` times on zeros at batch 1 and 32, so the first request pays no set-up."""
        for batch in (1, 32):
            feed = {
                spec.name: np.zeros(
                    [batch if d < 0 else d for d in spec.shape], NUMPY_DTYPES[spec.datatype]
                )
                for spec in self.card.inputs
            }
            for _ in range(runs):
                self.run(feed)

    def _check_signature(self) -> None:
        for declared, actual, kind in (
            (self.card.inputs, self._session.get_inputs(), "inputs"),
            (self.card.outputs, self._session.get_outputs(), "outputs"),
        ):
            want = [(t.name, ORT_TYPES[t.datatype], len(t.shape)) for t in declared]
            got = [(a.name, a.type, len(a.shape)) for a in actual]
            if want != got:
                raise SignatureMismatch(f"{self.card.file}: card {kind} {want} but graph has {got}")
