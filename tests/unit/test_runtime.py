"""StudentSession: verified loading, signature check, results equal to a numpy reference,
execution providers and session options from the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kdgate.service.cards import ModelFileMismatch, load_card, write_card
from kdgate.service.errors import InvalidInput
from kdgate.service.runtime import ProviderUnavailable, SignatureMismatch, StudentSession
from kdgate.service.settings import ServerSettings, SessionOptionsSettings, StudentSettings
from kdgate.service.state import load_student
from tests.support.dtype_models import MODELS, text_model, write_student
from tests.support.tiny_model import reference_logits, write_tiny_student


def test_results_equal_numpy(tmp_path: Path) -> None:
    session = StudentSession.from_card(write_tiny_student(tmp_path), intra_op_threads=1)
    session.warm_up(2)
    x = np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run({"input": x})["logits"], reference_logits(x), atol=1e-5)


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    card = write_tiny_student(tmp_path)
    (tmp_path / "student-v1.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileMismatch):
        StudentSession.from_card(card)


def test_card_signature_must_match_the_graph(tmp_path: Path) -> None:
    card_path = write_tiny_student(tmp_path)
    card = load_card(card_path)
    card.inputs[0].name = "pixels"
    write_card(card_path, card)
    with pytest.raises(SignatureMismatch, match="pixels"):
        StudentSession.from_card(card_path)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_datatype_and_signature_loads_and_warms_up(tmp_path: Path, name: str) -> None:
    session = StudentSession.from_card(write_student(tmp_path, name, MODELS[name]()))
    session.warm_up(1)  # BYTES inputs warm up on empty strings, not on zeros


def test_inputs_the_graph_cannot_run_are_invalid_input_with_the_reason(tmp_path: Path) -> None:
    session = StudentSession.from_card(write_student(tmp_path, "text", text_model()))
    feed = {"input_ids": np.ones((1, 2), np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    with pytest.raises(InvalidInput, match=r"cannot run on these inputs: .*broadcast") as caught:
        session.run(feed)
    assert "onnxruntime_src" not in str(caught.value)


def test_cpu_is_the_default_provider(tmp_path: Path) -> None:
    assert StudentSession.from_card(write_tiny_student(tmp_path)).providers == [
        "CPUExecutionProvider"
    ]


def test_a_provider_onnxruntime_lacks_is_refused_naming_the_available_ones(tmp_path: Path) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # a CPU-only build here
    with pytest.raises(ProviderUnavailable) as caught:
        StudentSession.from_card(
            write_tiny_student(tmp_path),
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    message = str(caught.value)
    assert "['CUDAExecutionProvider'] not available" in message
    assert str(ort.get_available_providers()) in message


def test_session_options_from_config_are_applied(tmp_path: Path) -> None:
    config = SessionOptionsSettings(
        intra_op_threads=3,
        inter_op_threads=2,
        graph_optimization_level="ORT_ENABLE_BASIC",
        execution_mode="parallel",
        allow_spinning=True,
        log_severity_level=4,
        config_entries={"session.use_env_allocators": "1"},
    )
    session = StudentSession.from_card(
        write_tiny_student(tmp_path),
        intra_op_threads=1,
        providers=["CPUExecutionProvider"],
        provider_options={"CPUExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}},
        config=config,
    )
    options = session.options
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.log_severity_level == 4
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.use_env_allocators") == "1"


def test_unset_thread_counts_keep_the_server_defaults(tmp_path: Path) -> None:
    session = StudentSession.from_card(
        write_tiny_student(tmp_path), intra_op_threads=2, inter_op_threads=1
    )
    assert (session.options.intra_op_num_threads, session.options.inter_op_num_threads) == (2, 1)
    assert session.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_load_student_uses_the_students_providers_and_options(tmp_path: Path) -> None:
    student = StudentSettings(
        version="1",
        card=write_tiny_student(tmp_path),
        session_options={"intra_op_threads": 2},
    )
    session = load_student(student, ServerSettings())
    assert session.options.intra_op_num_threads == 2
    with pytest.raises(ProviderUnavailable, match="OpenVINOExecutionProvider"):
        load_student(
            student.model_copy(update={"providers": ["OpenVINOExecutionProvider"]}),
            ServerSettings(),
        )
