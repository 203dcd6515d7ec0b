"""`kdgate import` on the four pair families: cards that load and verify, figures equal to an
independent onnxruntime + scipy computation, and clear refusals of pairs that cannot be compared."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from scipy.special import softmax
from scipy.stats import entropy

from kdgate.monitoring.drift import load_reference
from kdgate.service.cards import load_card, verify_model_file
from kdgate.service.importer import ImportRequest, IncomparablePair, import_pair
from kdgate.service.settings import load_settings
from stack.process import without_kdgate_env
from tests.support.fidelity_reference import brute_force_ece
from tests.support.live_server import REPO
from tests.support.pairs import Pair, PairCache

FAMILIES = ["digits", "tabular", "text", "images"]
KIND = {"digits": "logits", "tabular": "probabilities", "text": "logits", "images": "logits"}


def run_onnx(model: Path, output: str, sample: Path, names: dict[str, str] | None = None) -> Any:
    """One output of an ONNX file on an .npz sample, with onnxruntime directly."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(sample) as data:
        feeds = {i.name: data[(names or {}).get(i.name, i.name)] for i in session.get_inputs()}
    (out,) = session.run([output], feeds)
    return np.asarray(out, dtype=np.float64)


def probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    return scores if kind == "probabilities" else softmax(scores, axis=1)


def expected_figures(pair: Pair, kind: str) -> dict[str, float]:
    """Agreement, KL, ECE (teacher and labels), accuracy from onnxruntime + scipy + loops."""
    p = probabilities(run_onnx(pair.student, pair.scores, pair.sample), kind)
    q = probabilities(run_onnx(pair.teacher, pair.scores, pair.sample), kind)
    labels = np.load(pair.sample)["labels"]
    teacher_top = q.argmax(axis=1)
    return {
        "agreement": float(np.mean(p.argmax(axis=1) == teacher_top)),
        "kl_mean_nats": float(np.mean(entropy(q, p, axis=1))),
        "ece_teacher": brute_force_ece(p, teacher_top),
        "accuracy": float(np.mean(p.argmax(axis=1) == labels)),
        "ece": brute_force_ece(p, labels),
        "teacher_accuracy": float(np.mean(teacher_top == labels)),
    }


def imported(pair: Pair, out: Path, **options: Any) -> Any:
    request = ImportRequest(
        teacher=pair.teacher, student=pair.student, name=pair.family, out=out, **options
    )
    return import_pair(request)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_writes_cards_that_load_and_verify(
    family: str, pairs: PairCache, tmp_path: Path
) -> None:
    pair = pairs.get(family)
    result = imported(pair, tmp_path, sample=pair.sample)

    for role in ("teacher", "student"):
        path = tmp_path / f"{role}.card.json"
        card = load_card(path)
        verify_model_file(path, card)  # sha256 of the copied file
        assert card.role == role and card.name == family
        assert card.bytes == (tmp_path / card.file).stat().st_size
        assert card.output_kind == KIND[family]
        assert card.scores_output == pair.scores
        assert card.class_labels == [str(c) for c in range(pair.classes)]
        assert [t.name for t in card.inputs] == list(pair.inputs)
    teacher, student = load_card(tmp_path / "teacher.card.json"), result.student_card
    assert student.parent_teacher_sha256 == teacher.sha256
    assert teacher.parameters > 0
    with np.load(pair.sample) as data:
        # The signature is the files' own: the sample's dtypes, dynamic batch, fixed features.
        for spec in student.inputs:
            assert spec.shape == [-1, *data[spec.name].shape[1:]]
            assert np.dtype(spec.datatype.lower().replace("fp", "float")) == data[spec.name].dtype


def test_signatures_of_the_text_and_image_pairs(pairs: PairCache, tmp_path: Path) -> None:
    text = imported(pairs.get("text"), tmp_path / "text").student_card
    assert [(t.name, t.datatype, t.shape) for t in text.inputs] == [
        ("input_ids", "INT64", [-1, 16]),
        ("attention_mask", "INT64", [-1, 16]),
    ]
    images = imported(pairs.get("images"), tmp_path / "images").student_card
    assert [(t.name, t.datatype, t.shape) for t in images.inputs] == [
        ("images", "FP32", [-1, 3, 16, 16])
    ]
    assert [(t.name, t.datatype, t.shape) for t in images.outputs] == [("logits", "FP32", [-1, 3])]


@pytest.mark.parametrize("family", FAMILIES)
def test_figures_equal_an_independent_computation(
    family: str, pairs: PairCache, tmp_path: Path
) -> None:
    pair = pairs.get(family)
    figures = imported(pair, tmp_path, sample=pair.sample).student_card.metrics
    want = expected_figures(pair, KIND[family])
    for name, value in want.items():
        assert getattr(figures, name) == pytest.approx(value, rel=1e-3, abs=1e-9), name
    # Not trivially equal: the student differs from its teacher on every family.
    assert want["kl_mean_nats"] > 0 and want["agreement"] < 1
    teacher = load_card(tmp_path / "teacher.card.json").metrics
    assert teacher.accuracy == pytest.approx(want["teacher_accuracy"], rel=1e-3)
    assert figures.size_ratio == pytest.approx(
        pair.teacher.stat().st_size / pair.student.stat().st_size
    )


def test_probabilities_and_logits_of_the_same_models_give_the_same_figures(
    pairs: PairCache, tmp_path: Path
) -> None:
    as_probs, as_logits = pairs.get("tabular"), pairs.get("tabular", logits=True)
    probs = imported(as_probs, tmp_path / "p", sample=as_probs.sample).student_card
    logits = imported(as_logits, tmp_path / "l", sample=as_logits.sample).student_card
    assert (probs.output_kind, logits.output_kind) == ("probabilities", "logits")
    for name in ("agreement", "kl_mean_nats", "ece_teacher", "accuracy", "ece"):
        assert getattr(probs.metrics, name) == pytest.approx(
            getattr(logits.metrics, name), rel=1e-3
        ), name


def test_the_kind_is_read_from_the_graph_without_a_sample(pairs: PairCache, tmp_path: Path) -> None:
    # The tabular teacher ends in a Softmax node, its student in a LinearClassifier whose
    # post-transform is SOFTMAX; digits ends in a MatMul/Gemm: logits.
    tabular = imported(pairs.get("tabular"), tmp_path / "t")
    assert tabular.student_card.output_kind == tabular.teacher_card.output_kind == "probabilities"
    digits = imported(pairs.get("digits"), tmp_path / "d")
    assert digits.student_card.output_kind == "logits"
    assert digits.student_card.metrics.agreement is None  # nothing measured without a sample
    assert not (tmp_path / "d" / "reference.npz").exists()


def test_the_sample_is_kept_as_the_drift_reference(pairs: PairCache, tmp_path: Path) -> None:
    text = pairs.get("text")
    imported(text, tmp_path / "text", sample=text.sample)
    with np.load(tmp_path / "text" / "reference.npz") as ref, np.load(text.sample) as sample:
        for name in text.inputs:
            np.testing.assert_array_equal(ref[name], sample[name])
        assert sorted(ref.files) == sorted(text.inputs)  # two inputs: no single table
    tabular = pairs.get("tabular")
    imported(tabular, tmp_path / "tab", sample=tabular.sample)
    # A single [N, D] input is also under `inputs`, the key the table drift reads.
    reference = load_reference(tmp_path / "tab" / "reference.npz")
    np.testing.assert_array_equal(reference, np.load(tabular.sample)["float_input"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_sample_gives_the_npz_figures(
    suffix: str, pairs: PairCache, tmp_path: Path
) -> None:
    pair = pairs.get("tabular")
    with np.load(pair.sample) as data:
        frame = pd.DataFrame(data["float_input"], columns=[f"f{i}" for i in range(12)])
        frame["label"] = data["labels"]
    table = tmp_path / f"sample{suffix}"
    frame.to_csv(table, index=False) if suffix == ".csv" else frame.to_parquet(table)
    from_table = imported(pair, tmp_path / "t", sample=table).student_card.metrics
    from_npz = imported(pair, tmp_path / "n", sample=pair.sample).student_card.metrics
    assert from_table.kl_mean_nats == pytest.approx(from_npz.kl_mean_nats, rel=1e-5)
    assert from_table.accuracy == pytest.approx(from_npz.accuracy)


def test_the_written_config_serves_the_pair(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("images")
    result = imported(pair, tmp_path, sample=pair.sample)
    settings = load_settings(result.config_path)
    (model,) = settings.models
    assert model.name == "images"
    assert model.students[0].card == tmp_path / "student.card.json"
    assert model.teacher is not None and model.teacher.card == tmp_path / "teacher.card.json"
    assert result.config_path.read_text() == result.config_yaml


def renamed_inputs(source: Path, target: Path, names: dict[str, str]) -> Path:
    """A copy of an ONNX model whose graph inputs are renamed."""
    model = onnx.load(str(source))
    for value in model.graph.input:
        value.name = names.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
    onnx.save(model, str(target))
    return target


def test_an_input_map_matches_inputs_named_differently(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("text")
    student = renamed_inputs(pair.student, tmp_path / "s.onnx", {"input_ids": "ids"})
    with np.load(pair.sample) as data:
        sample = tmp_path / "sample.npz"
        np.savez(sample, ids=data["input_ids"], attention_mask=data["attention_mask"])
    request = ImportRequest(teacher=pair.teacher, student=student, name="t", out=tmp_path / "o")
    with pytest.raises(
        IncomparablePair, match=r"no student input for the teacher's \['input_ids'\]"
    ):
        import_pair(request)
    done = kdgate_import(
        "--teacher", pair.teacher, "--student", student, "--name", "t", "--sample", sample,
        "--input-map", "ids=input_ids", "--out", tmp_path / "o",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["models"][0]["teacher"]["input_map"] == {"ids": "input_ids"}
    # The teacher ran on the sample through the mapping: the same figures as unrenamed.
    want = imported(pair, tmp_path / "plain", sample=pair.sample).student_card.metrics
    got = load_card(tmp_path / "o" / "student.card.json").metrics
    assert got.kl_mean_nats == pytest.approx(want.kl_mean_nats)


def linear_model(
    path: Path, features: int, outputs: int, *, dtype: int = TensorProto.FLOAT
) -> Path:
    """x [N, features] -> x @ W [N, outputs], input `float_input`, output `probabilities`."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(features, outputs)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["float_input"], ["x"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"]))
    nodes.append(helper.make_node("Softmax", ["z"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("float_input", dtype, [None, features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, outputs])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def kdgate_import(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kdgate.service.cli", "import", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=without_kdgate_env(),
    )


def test_cli_refuses_a_pair_with_different_class_counts(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("tabular")
    student = linear_model(tmp_path / "three.onnx", 12, 3)
    done = kdgate_import(
        "--teacher", pair.teacher, "--student", student, "--name", "x", "--out", tmp_path / "o"
    )
    assert done.returncode == 1, done.stderr
    assert "'probabilities' has 3 classes but the teacher's 'probabilities' has 4" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "o" / "kdgate.yaml").exists()


def test_cli_refuses_a_pair_whose_inputs_cannot_be_matched(
    pairs: PairCache, tmp_path: Path
) -> None:
    text, images = pairs.get("text"), pairs.get("images")
    done = kdgate_import(
        "--teacher", text.teacher, "--student", images.student, "--name", "x", "--out", tmp_path
    )
    assert done.returncode == 1, done.stderr
    assert "inputs cannot be matched" in done.stderr
    assert "['input_ids', 'attention_mask']" in done.stderr and "--input-map" in done.stderr


def test_a_datatype_mismatch_is_refused(pairs: PairCache, tmp_path: Path) -> None:
    teacher = linear_model(tmp_path / "t.onnx", 12, 4, dtype=TensorProto.DOUBLE)
    student = linear_model(tmp_path / "s.onnx", 12, 4)
    request = ImportRequest(teacher=teacher, student=student, name="x", out=tmp_path / "o")
    with pytest.raises(IncomparablePair, match="FP32 in the student but 'float_input' is FP64"):
        import_pair(request)


def test_cli_imports_a_pair_and_prints_the_config(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("tabular")
    done = kdgate_import(
        "--teacher", pair.teacher, "--student", pair.student, "--name", "churn",
        "--sample", pair.sample, "--out", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == yaml.safe_load((tmp_path / "kdgate.yaml").read_text())
    assert f"kdgate serve --config {tmp_path / 'kdgate.yaml'}" in done.stderr


def regression_model(path: Path, scale: float) -> Path:
    """x [N, 4] -> sum(x) * scale [N, 1]."""
    weight = np.full((4, 1), scale, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "reg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_one_column_float_output_is_compared_as_regression(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32) + 3
    np.savez(tmp_path / "sample.npz", x=x)
    request = ImportRequest(
        teacher=regression_model(tmp_path / "t.onnx", 1.0),
        student=regression_model(tmp_path / "s.onnx", 1.1),
        name="price",
        out=tmp_path / "o",
        sample=tmp_path / "sample.npz",
    )
    card = import_pair(request).student_card
    assert card.output_kind == "regression" and card.class_labels == []
    teacher = x.astype(np.float64).sum(axis=1)
    extra = card.metrics.extra
    assert extra["mean_absolute_error"] == pytest.approx(np.mean(np.abs(0.1 * teacher)), rel=1e-5)
    assert extra["mean_relative_error"] == pytest.approx(0.1, rel=1e-4)
    assert card.metrics.agreement is None and card.metrics.ece_teacher is None


def test_a_sample_missing_an_input_is_refused(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("text")
    np.savez(tmp_path / "ids.npz", input_ids=np.load(pair.sample)["input_ids"])
    with pytest.raises(IncomparablePair, match=r"no array for input\(s\) \['attention_mask'\]"):
        imported(pair, tmp_path / "o", sample=tmp_path / "ids.npz")


def readme_pair_commands() -> list[list[str]]:
    """The commands of the README's "Bring your own pair" block, one argv each."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Bring your own pair", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line]


def test_the_readme_commands_import_and_serve_the_shipped_pair(tmp_path: Path) -> None:
    (tmp_path / "models").symlink_to(REPO / "models")  # the README's paths, from its cwd
    imported_, serve = readme_pair_commands()
    assert imported_[:2] == ["kdgate", "import"] and serve[:2] == ["kdgate", "serve"]
    cli = [sys.executable, "-m", "kdgate.service.cli"]
    env = {**without_kdgate_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*cli, *imported_[1:]], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    # `serve` on that config: `config check` loads it, cards and all, without binding a port.
    config = serve[serve.index("--config") + 1]
    check = subprocess.run(
        [*cli, "config", "check", config], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    card = load_card(tmp_path / "my-pair" / "student.card.json")
    assert card.metrics.agreement is not None and card.metrics.agreement > 0.95


def softmax_by_hand(path: Path, seed: int) -> Path:
    """x [N, 4] -> exp(x W) / sum(exp(x W)) [N, 3], without a Softmax node."""
    weight = np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Exp", ["z"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
        helper.make_node("Div", ["e", "s"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "by_hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_probabilities_are_recognised_on_the_sample(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    np.savez(tmp_path / "sample.npz", x=x, labels=np.zeros(300, np.int64))
    teacher = softmax_by_hand(tmp_path / "t.onnx", 1)
    student = softmax_by_hand(tmp_path / "s.onnx", 2)
    request = ImportRequest(teacher=teacher, student=student, name="p", out=tmp_path / "no")
    assert import_pair(request).student_card.output_kind == "logits"  # nothing tells, unmeasured
    with_sample = ImportRequest(
        teacher=teacher,
        student=student,
        name="p",
        out=tmp_path / "o",
        sample=tmp_path / "sample.npz",
    )
    card = import_pair(with_sample).student_card
    assert card.output_kind == "probabilities"
    p = run_onnx(student, "scores", tmp_path / "sample.npz")
    q = run_onnx(teacher, "scores", tmp_path / "sample.npz")
    # Never softmaxed again: KL of the probabilities themselves.
    assert card.metrics.kl_mean_nats == pytest.approx(np.mean(entropy(q, p, axis=1)), rel=1e-4)
    assert card.metrics.ece_teacher == pytest.approx(brute_force_ece(p, q.argmax(1)), rel=1e-4)


def test_labels_that_are_not_class_indices_are_refused(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs.get("tabular")
    with np.load(pair.sample) as data:
        np.savez(tmp_path / "s.npz", float_input=data["float_input"], labels=data["labels"] + 0.5)
    with pytest.raises(IncomparablePair, match="labels must be class indices"):
        imported(pair, tmp_path / "o", sample=tmp_path / "s.npz")


def test_a_name_the_config_would_refuse_is_refused_first(pairs: PairCache, tmp_path: Path) -> None:
    digits = pairs.get("digits")
    request = ImportRequest(
        teacher=digits.teacher, student=digits.student, name="my model", out=tmp_path / "o"
    )
    with pytest.raises(IncomparablePair, match="--name 'my model' cannot name a served model"):
        import_pair(request)
    assert not (tmp_path / "o").exists()
