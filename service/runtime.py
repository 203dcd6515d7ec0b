"""An onnxruntime session for one student version, loaded only from verified bytes.

The session runs inline on the event loop. Measured on the 2-core dev machine (shared with a
training job, so on the high side): one run of a 64->256->256->10 MLP (the digits student class)
costs ~38 us at batch 1 and ~190 us at batch 32, while the same run through `asyncio.to_thread`
costs ~174 us at batch 1 (thread hop, future, loop wake-up). A thread would cost more than the
work it moves, and both are far under the ~1 ms at which STYLE.md says a run must leave the loop.
A heavier student must revisit this (docs/configuration.md).

Each model runs on the execution providers its config names (CPU by default), with its own
session options; a provider the installed onnxruntime lacks is refused with the list of those
it has, since onnxruntime itself would only warn and fall back to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from kdgate.service.cards import ModelCard, TensorSpec, load_card, verify_model_file
from kdgate.service.datatypes import NUMPY_DTYPES, ORT_TYPES
from kdgate.service.errors import InvalidInput
from kdgate.service.settings import CPU_PROVIDER, SessionOptionsSettings
from kdgate.service.tensors import Signature

# What `InferenceSession(providers=...)` takes: a name, or a name and that provider's options.
Provider = str | tuple[str, dict[str, Any]]
CPU_ONLY: tuple[Provider, ...] = (CPU_PROVIDER,)
_DEFAULT_OPTIONS = SessionOptionsSettings()


class SignatureMismatch(Exception):
    """The ONNX graph's inputs/outputs are not the ones its card declares."""


class ProviderUnavailable(ValueError):
    """A configured execution provider is not in this onnxruntime build."""


class OnnxSessionConfig(NamedTuple):
    """What one model's `ort.InferenceSession` is built with."""

    options: ort.SessionOptions
    providers: list[Provider]


def session_options(
    config: SessionOptionsSettings = _DEFAULT_OPTIONS,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> ort.SessionOptions:
    """onnxruntime options from `config`; its null thread counts take the defaults given.

    The defaults suit a small model served by one worker per container: one intra-op thread
    (a tiny MLP gains nothing from a pool, and pool threads steal the core the event loop
    needs), sequential execution (the graph is a chain), no spinning.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = _or(config.intra_op_threads, intra_op_threads)
    options.inter_op_num_threads = _or(config.inter_op_threads, inter_op_threads)
    options.execution_mode = getattr(ort.ExecutionMode, "ORT_" + config.execution_mode.upper())
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, "ORT_" + config.graph_optimization_level.upper()
    )
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    if config.log_severity_level is not None:
        options.log_severity_level = config.log_severity_level
    for key, value in config.config_entries.items():
        options.add_session_config_entry(key, value)
    return options


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime offers, in its order of preference."""
    return list(ort.get_available_providers())


def check_providers(providers: Sequence[str]) -> None:
    """Raise `ProviderUnavailable` naming what is available if any of `providers` is not.

    onnxruntime itself only warns and falls back to the CPU, so a model meant for a GPU would
    run slowly without anyone being told.
    """
    available = available_providers()
    missing = [name for name in providers if name not in available]
    if missing:
        raise ProviderUnavailable(
            f"onnxruntime execution provider(s) {missing} not available here; this onnxruntime "
            f"{ort.__version__} offers {available}"
        )


def onnx_session_config(
    providers: Sequence[str],
    provider_options: dict[str, dict[str, Any]],
    config: SessionOptionsSettings,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> OnnxSessionConfig:
    """Session options and providers for one model, its providers checked to be available."""
    check_providers(providers)
    return OnnxSessionConfig(
        session_options(
            config, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads
        ),
        [
            (name, provider_options[name]) if name in provider_options else name
            for name in providers
        ],
    )


class StudentSession:
    """One student version: its card, signature and onnxruntime session."""

    def __init__(
        self,
        card: ModelCard,
        model_bytes: bytes,
        options: ort.SessionOptions,
        providers: Sequence[Provider] = CPU_ONLY,
    ) -> None:
        self.card = card
        self.signature = Signature.from_card(card)
        check_providers([p if isinstance(p, str) else p[0] for p in providers])
        self._session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=list(providers)
        )
        self._check_signature()
        self._output_names = list(self.signature.outputs)
        # The binding under `InferenceSession.run`: the wrapper re-checks input names (the
        # codecs already did), OrtValue ownership and WebGPU graph capture, ~6 us of a ~17 us
        # batch-1 run here. Falls back to the public method if a release renames `_sess`.
        self._run = getattr(self._session, "_sess", self._session).run

    @classmethod
    def from_card(
        cls,
        card_path: Path | str,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] = (CPU_PROVIDER,),
        provider_options: dict[str, dict[str, Any]] | None = None,
        config: SessionOptionsSettings = _DEFAULT_OPTIONS,
    ) -> StudentSession:
        """Load the card, verify the model file's sha256 and build the session from those bytes.

        `config`'s thread counts, where set, win over `intra_op_threads`/`inter_op_threads`.
        """
        card = load_card(card_path)
        model_bytes = verify_model_file(card_path, card)
        session = onnx_session_config(
            providers,
            provider_options or {},
            config,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        return cls(card, model_bytes, session.options, session.providers)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, in order of preference."""
        return list(self._session.get_providers())

    @property
    def options(self) -> ort.SessionOptions:
        """The options the session was built with (as onnxruntime reports them)."""
        return self._session.get_session_options()

    def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model on validated inputs; returns the outputs by name."""
        try:
            results = self._run(self._output_names, inputs, None)
        except (OrtFail, OrtInvalidArgument) as exc:
            # Inputs that fit the signature can still fail inside the graph (dynamic sizes that
            # disagree, a token id past the vocabulary): the caller's to fix, with the reason.
            raise InvalidInput(f"the model cannot run on these inputs: {_reason(exc)}") from None
        # Not strict: onnxruntime returns one result per name asked for; checking costs ~1 us,
        # and even `strict=False` spelled out costs a keyword parse.
        return dict(zip(self._output_names, results))  # noqa: B905

    def warm_up(self, runs: int) -> None:
        """Run `runs` times on zeros at batch 1 and 32, so the first request pays no set-up."""
        for batch in (1, 32):
            feed = {spec.name: blank(spec, batch) for spec in self.card.inputs}
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


def blank(spec: TensorSpec, batch: int) -> np.ndarray[Any, Any]:
    """An input of `spec` holding zeros (BYTES: empty strings), `batch` for dynamic dimensions."""
    shape = [batch if d < 0 else d for d in spec.shape]
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, NUMPY_DTYPES[spec.datatype])


def _reason(exc: Exception) -> str:
    """onnxruntime's status message without its source file locations, on one line."""
    text = str(exc).split("Status Message: ", 1)[-1]
    text = text.split(" was false. ", 1)[-1]  # past a failed check's source location and code
    return " ".join(w for w in text.split() if "/onnxruntime_src/" not in w)[:300]
