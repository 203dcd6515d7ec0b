"""`kdgate import`: cards, figures, a drift reference and a config from two ONNX files.

    pair = import_pair(ImportRequest(teacher=Path("t.onnx"), student=Path("s.onnx"),
                                     name="churn", out=Path("churn"), sample=Path("x.npz")))
    pair.config_path        # churn/kdgate.yaml: `kdgate serve --config churn/kdgate.yaml`

What it does, in order: reads both signatures with onnxruntime (element types through
`service.datatypes.FROM_ORT_TYPES`, dynamic dimensions as -1); checks the pair is comparable
(every input matched by name or through `input_map`, same datatypes, same number of classes);
picks the scores output (`service.cards.scores_output`) and its kind (logits, probabilities,
regression; docs/decisions.md says how); runs both models on the sample and measures agreement,
KL(teacher || student) and ECE against the teacher (accuracy and ECE against labels when the
sample has them) with `monitoring.fidelity`, the maths the live metrics use; copies the ONNX files
into `out`, writes both cards, the sample as the drift reference and the config.

A pair that cannot be compared raises `IncomparablePair`, whose message says why.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import yaml
from pydantic import ValidationError

from kdgate.monitoring import fidelity
from kdgate.monitoring.card_figures import CardFigures
from kdgate.service.cards import ModelCard, TensorSpec, scores_output, sha256_file, write_card
from kdgate.service.datatypes import FROM_ORT_TYPES, NUMPY_DTYPES
from kdgate.service.endpoints import package_version
from kdgate.service.settings import ModelSettings, StudentSettings

OutputKind = Literal["logits", "probabilities", "regression"]
Array = npt.NDArray[Any]

VERSION = "1"
REFERENCE_FILE = "reference.npz"  # the drift settings' default `reference_file`
REFERENCE_TABLE_KEY = "inputs"  # the drift settings' default `reference_key`
CONFIG_FILE = "kdgate.yaml"
LABEL_COLUMNS = ("labels", "label")
# Probabilities are compared as log(clip(p, EPS, 1)): log-softmax of that is exactly the clipped
# and renormalised log-probability `fidelity.kl_from_probs` uses, so one set of functions (the
# logits ones) serves both kinds and a probability is never softmaxed again.
EPS = 1e-12
SUM_TOLERANCE = 1e-3  # rows of float32 probabilities sum to 1 within this
RUN_ROWS = 256  # sample rows per onnxruntime run
# Ops that pass values through unchanged, followed back from the scores to find a Softmax.
PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# scikit-learn's converted classifiers apply the softmax inside one ai.onnx.ml op.
ML_CLASSIFIERS = frozenset({"LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier"})


class IncomparablePair(Exception):
    """The two models cannot be served as a pair; the message says why."""


@dataclass(frozen=True)
class ImportRequest:
    """What `kdgate import` was asked; `input_map` maps student input names to the teacher's."""

    teacher: Path
    student: Path
    name: str
    out: Path
    sample: Path | None = None
    input_map: Mapping[str, str] = field(default_factory=dict)
    scores_output: str | None = None
    output_kind: OutputKind | None = None
    class_labels: list[str] | None = None


@dataclass(frozen=True)
class Imported:
    """What `import_pair` wrote."""

    config_path: Path
    config_yaml: str
    teacher_card: ModelCard
    student_card: ModelCard


@dataclass(frozen=True)
class Sample:
    """Inputs by student input name, and the class labels when the sample has them."""

    inputs: dict[str, Array]
    labels: Array | None


@dataclass
class _Model:
    """One ONNX file: its session, graph and signature."""

    path: Path
    session: ort.InferenceSession
    graph: onnx.GraphProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def role_name(self) -> str:
        return self.path.name

    def spec(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def import_pair(request: ImportRequest) -> Imported:
    """Check, measure and write a served pair into `request.out` (see the module docstring)."""
    _check_name(request.name)
    teacher, student = _read_model(request.teacher), _read_model(request.student)
    to_teacher = match_inputs(student.inputs, teacher.inputs, request.input_map)
    student_scores = _scores_name(student, request.scores_output)
    teacher_scores = _scores_name(teacher, request.scores_output)

    sample = load_sample(request.sample, student.inputs) if request.sample else None
    s_out = t_out = None
    if sample is not None:
        s_out = _run(student, student_scores, sample.inputs)
        t_out = _run(teacher, teacher_scores, {to_teacher[k]: v for k, v in sample.inputs.items()})
    s_kind = detect_kind(student, student_scores, s_out, request.output_kind)
    t_kind = detect_kind(teacher, teacher_scores, t_out, request.output_kind)
    if (s_kind == "regression") != (t_kind == "regression"):
        raise IncomparablePair(
            f"the student's {student_scores!r} is {s_kind} but the teacher's {teacher_scores!r} is "
            f"{t_kind}: a classifier cannot be compared with a regressor (--output-kind decides)"
        )
    classes = _class_count(student, student_scores, s_out, teacher, teacher_scores, t_out)
    labels = request.class_labels
    if s_kind == "regression":
        labels = []
    elif labels is None:
        labels = [str(i) for i in range(classes)]
    elif len(labels) != classes:
        raise IncomparablePair(f"{len(labels)} class labels given for {classes} classes")

    request.out.mkdir(parents=True, exist_ok=True)
    teacher_file = _copy(request.teacher, request.out / "teacher.onnx")
    student_file = _copy(request.student, request.out / "student.onnx")
    teacher_card = _card(
        teacher, teacher_file, request.name, "teacher", t_kind, teacher_scores, labels
    )
    student_card = _card(
        student, student_file, request.name, "student", s_kind, student_scores, labels
    )
    student_card.parent_teacher_sha256 = teacher_card.sha256
    if sample is not None and s_out is not None and t_out is not None:
        teacher_card.metrics = _label_figures(t_out, t_kind, sample.labels)
        student_card.metrics = measure(s_out, s_kind, t_out, t_kind, sample.labels)
        student_card.metrics = student_card.metrics.model_copy(
            update={"size_ratio": teacher_card.bytes / max(student_card.bytes, 1)}
        )
        write_reference(request.out / REFERENCE_FILE, sample)
        dataset: dict[str, Any] = {"sample": request.sample.name if request.sample else None}
        dataset["rows"] = len(next(iter(sample.inputs.values())))
        teacher_card.dataset = student_card.dataset = dataset
    write_card(request.out / "teacher.card.json", teacher_card)
    write_card(request.out / "student.card.json", student_card)

    mapping = {s: t for s, t in to_teacher.items() if s != t}
    text = config_yaml(request.name, mapping)
    config_path = request.out / CONFIG_FILE
    config_path.write_text(text)
    return Imported(config_path, text, teacher_card, student_card)


def config_yaml(name: str, input_map: Mapping[str, str]) -> str:
    """The config serving the imported pair; card paths are relative to the config file."""
    teacher: dict[str, Any] = {"card": "teacher.card.json"}
    if input_map:
        teacher["input_map"] = dict(input_map)
    model = {
        "name": name,
        "students": [{"version": VERSION, "card": "student.card.json"}],
        "teacher": teacher,
    }
    return yaml.safe_dump({"models": [model]}, sort_keys=False)


def read_signature(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an onnxruntime session as card tensor specs.

    Dynamic dimensions (named or unknown) become -1; a non-tensor type (the ZipMap a
    scikit-learn converter adds unless told not to) is refused.
    """

    def specs(args: list[Any], what: str) -> list[TensorSpec]:
        out = []
        for arg in args:
            datatype = FROM_ORT_TYPES.get(arg.type)
            if datatype is None:
                hint = " (a ZipMap: convert with zipmap disabled)" if "map" in arg.type else ""
                raise IncomparablePair(f"{what} {arg.name!r} has type {arg.type}{hint}")
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
            out.append(TensorSpec(name=arg.name, datatype=datatype, shape=shape))  # type: ignore[arg-type]
        return out

    return specs(session.get_inputs(), "input"), specs(session.get_outputs(), "output")


def match_inputs(
    student: list[TensorSpec], teacher: list[TensorSpec], input_map: Mapping[str, str]
) -> dict[str, str]:
    """Student input name -> teacher input name, or `IncomparablePair` saying what differs."""
    s_names, t_names = [t.name for t in student], [t.name for t in teacher]
    for s, t in input_map.items():
        if s not in s_names:
            raise IncomparablePair(f"--input-map names {s!r}, not a student input {s_names}")
        if t not in t_names:
            raise IncomparablePair(f"--input-map names {t!r}, not a teacher input {t_names}")
    mapping = {s: input_map.get(s, s) for s in s_names}
    fed = set(mapping.values())
    missing = [t for t in t_names if t not in fed]
    extra = [s for s, t in mapping.items() if t not in t_names]
    if missing or extra:
        raise IncomparablePair(
            f"the inputs cannot be matched: student inputs {s_names}, teacher inputs {t_names}"
            + (f"; no student input for the teacher's {missing}" if missing else "")
            + (f"; the teacher takes no {extra}" if extra else "")
            + "; pass --input-map STUDENT=TEACHER for names that differ"
        )
    teacher_specs = {t.name: t for t in teacher}
    for spec in student:
        other = teacher_specs[mapping[spec.name]]
        if spec.datatype != other.datatype:
            raise IncomparablePair(
                f"input {spec.name!r} is {spec.datatype} in the student but {other.name!r} is "
                f"{other.datatype} in the teacher"
            )
        if not _same_shape(spec.shape, other.shape):
            raise IncomparablePair(
                f"input {spec.name!r} has shape {spec.shape} in the student but {other.name!r} "
                f"has shape {other.shape} in the teacher"
            )
    return mapping


def load_sample(path: Path, inputs: list[TensorSpec]) -> Sample:
    """A sample for the student's `inputs`: .npz (one array per input name, optional `labels`;
    a single input may be under `inputs`, as in a drift reference), or .parquet/.csv for a
    model with one [N, D] input (columns are features; an optional `label`/`labels` column).
    Arrays are cast to the inputs' datatypes where numpy can do so without changing kind
    (int -> float is fine, float -> int is refused)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
        labels = arrays.pop("labels", None)
        if len(inputs) == 1 and inputs[0].name not in arrays and REFERENCE_TABLE_KEY in arrays:
            # A drift reference (the table under `inputs`) is a sample too.
            arrays[inputs[0].name] = arrays[REFERENCE_TABLE_KEY]
    elif suffix in (".parquet", ".csv"):
        if len(inputs) != 1 or len(inputs[0].shape) != 2:
            raise IncomparablePair(
                f"a {suffix} sample needs a model with one [N, D] input; this one takes "
                f"{[(t.name, t.shape) for t in inputs]}: use an .npz, one array per input name"
            )
        arrays, labels = _table(path, inputs[0].name)
    else:
        raise IncomparablePair(f"sample {path.name}: expected .npz, .parquet or .csv")
    missing = [t.name for t in inputs if t.name not in arrays]
    if missing:
        raise IncomparablePair(f"sample {path.name} has no array for input(s) {missing}")
    rows = {len(arrays[t.name]) for t in inputs} | ({len(labels)} if labels is not None else set())
    if len(rows) != 1 or 0 in rows:
        raise IncomparablePair(f"sample {path.name}: arrays differ in rows or are empty ({rows})")
    cast = {t.name: _cast(arrays[t.name], t, path) for t in inputs}
    return Sample(cast, None if labels is None else _class_indices(np.asarray(labels), path))


def detect_kind(
    model: _Model, scores: str, values: Array | None, override: OutputKind | None
) -> OutputKind:
    """What `scores` holds (see docs/decisions.md): the override; else a float output of one
    column is regression; else probabilities when a Softmax produces it or, measured on the
    sample, its rows are non-negative and sum to 1; else logits."""
    if override is not None:
        return override
    spec = model.spec(scores)
    one_column = len(spec.shape) == 1 or spec.shape[-1] == 1
    if values is not None:
        one_column = values.ndim == 1 or values.shape[-1] == 1
    if one_column and spec.datatype in ("FP16", "FP32", "FP64"):
        return "regression"
    if _from_softmax(model.graph, scores):
        return "probabilities"
    if values is not None and _rows_are_probabilities(values):
        return "probabilities"
    return "logits"


def as_logits(scores: Array, kind: OutputKind) -> npt.NDArray[np.float64]:
    """Scores [N, C] as logits: probabilities become log(clip(p, EPS, 1)), so the logits
    functions of `monitoring.fidelity` give the probabilities' figures (see `EPS`)."""
    values = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if kind == "probabilities":
        return np.log(np.clip(values, EPS, 1.0))
    return values


def measure(
    student: Array,
    student_kind: OutputKind,
    teacher: Array,
    teacher_kind: OutputKind,
    labels: Array | None,
) -> CardFigures:
    """The student card's figures on the sample: against the teacher, and the labels if any."""
    if student_kind == "regression":
        s = np.asarray(student, np.float64).reshape(-1)
        t = np.asarray(teacher, np.float64).reshape(-1)
        error = np.abs(s - t)
        relative = error / np.maximum(np.abs(t), EPS)
        extra = {
            "mean_absolute_error": float(error.mean()),
            "mean_relative_error": float(relative.mean()),
        }
        return CardFigures(extra=extra)
    s, t = as_logits(student, student_kind), as_logits(teacher, teacher_kind)
    teacher_top = t.argmax(axis=1)
    figures = _label_figures(student, student_kind, labels).model_copy(
        update={
            "agreement": float(fidelity.agreement(s, t).mean()),
            "kl_mean_nats": float(fidelity.kl_from_logits(t, s).mean()),
            "ece_teacher": fidelity.ece(fidelity.calibration_against(s, teacher_top)),
        }
    )
    if labels is not None:
        teacher_accuracy = float(np.mean(teacher_top == labels))
        figures = figures.model_copy(update={"teacher_accuracy": teacher_accuracy})
    return figures


def write_reference(path: Path, sample: Sample) -> None:
    """The sample as the drift reference: one array per input name, plus `inputs` (float32)
    for a single [N, D] numeric input, the key the table drift reads."""
    arrays = dict(sample.inputs)
    if len(arrays) == 1:
        (only,) = arrays.values()
        if only.ndim == 2 and only.dtype.kind in "biuf":
            arrays.setdefault(REFERENCE_TABLE_KEY, only.astype(np.float32))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def _check_name(name: str) -> None:
    # The config's own rule, before anything is written: a name it refuses would only fail
    # at `kdgate serve`.
    student = StudentSettings(version=VERSION, card=Path("student.card.json"))
    try:
        ModelSettings(name=name, students=[student])
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise IncomparablePair(f"--name {name!r} cannot name a served model: {reason}") from exc


def _read_model(path: Path) -> _Model:
    if not path.is_file():
        raise IncomparablePair(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx and onnxruntime raise their own types for a bad file
        raise IncomparablePair(f"{path.name}: not a model onnxruntime can load: {exc}") from exc
    inputs, outputs = read_signature(session)
    return _Model(path, session, proto.graph, inputs, outputs)


def _scores_name(model: _Model, requested: str | None) -> str:
    names = [t.name for t in model.outputs]
    probe = ModelCard(
        name="probe", role="student", version=VERSION, file=model.path.name, sha256="0" * 64,
        bytes=0, inputs=model.inputs, outputs=model.outputs, scores_output=requested,
    )  # fmt: skip
    picked = scores_output(probe)
    if picked is None:
        given = f"--scores-output {requested!r} is not one of" if requested else "outputs are"
        raise IncomparablePair(
            f"{model.role_name}: cannot tell which output holds the scores ({given} {names}); "
            "pass --scores-output NAME"
        )
    return picked


def _run(model: _Model, scores: str, feeds: dict[str, Array]) -> Array:
    rows = len(next(iter(feeds.values())))
    parts = []
    try:
        # In slices: a large sample through a large teacher would otherwise need all of its
        # activations at once.
        for start in range(0, rows, RUN_ROWS):
            chunk = {k: v[start : start + RUN_ROWS] for k, v in feeds.items()}
            parts.append(np.asarray(model.session.run([scores], chunk)[0]))
    except Exception as exc:  # onnxruntime's errors name the input and what it expected
        raise IncomparablePair(f"{model.role_name} failed on the sample: {exc}") from exc
    return np.concatenate(parts)


def _class_count(
    student: _Model,
    s_name: str,
    s_out: Array | None,
    teacher: _Model,
    t_name: str,
    t_out: Array | None,
) -> int:
    def columns(model: _Model, name: str, out: Array | None) -> int | None:
        if out is not None:
            return 1 if out.ndim == 1 else int(math.prod(out.shape[1:]))
        shape = model.spec(name).shape
        if len(shape) == 1:
            return 1
        return None if -1 in shape[1:] else int(math.prod(shape[1:]))

    s, t = columns(student, s_name, s_out), columns(teacher, t_name, t_out)
    if s is None or t is None:
        raise IncomparablePair(
            "the number of classes is not fixed in the graphs: give --sample to measure it"
        )
    if s != t:
        raise IncomparablePair(
            f"the student's {s_name!r} has {s} classes but the teacher's {t_name!r} has {t}"
        )
    return s


def _card(
    model: _Model,
    file: Path,
    name: str,
    role: Literal["teacher", "student"],
    kind: OutputKind,
    scores: str,
    class_labels: list[str],
) -> ModelCard:
    return ModelCard(
        name=name,
        role=role,
        version=VERSION,
        file=file.name,
        sha256=sha256_file(file),
        bytes=file.stat().st_size,
        parameters=_parameters(model.graph),
        inputs=model.inputs,
        outputs=model.outputs,
        output_kind=kind,
        scores_output=scores,
        class_labels=class_labels,
        hyperparameters={"imported_from": model.path.name},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        kdgate_version=package_version(),
    )


def _label_figures(scores: Array, kind: OutputKind, labels: Array | None) -> CardFigures:
    if labels is None or kind == "regression":
        return CardFigures()
    logits = as_logits(scores, kind)
    return CardFigures(
        accuracy=float(np.mean(logits.argmax(axis=1) == labels)),
        ece=fidelity.ece(fidelity.calibration_against(logits, labels)),
    )


def _parameters(graph: onnx.GraphProto) -> int:
    return sum(math.prod(init.dims) for init in graph.initializer)


def _from_softmax(graph: onnx.GraphProto, output: str) -> bool:
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None:
        return False
    if node.op_type == "Softmax":
        return True
    if node.op_type in ML_CLASSIFIERS:
        transform = next((a.s for a in node.attribute if a.name == "post_transform"), b"")
        return transform == b"SOFTMAX"
    if node.op_type == "Normalizer" and node.domain == "ai.onnx.ml":
        # skl2onnx's one-vs-rest classifiers (LogisticRegression): per-class sigmoids, then an
        # L1 normaliser makes each row a distribution.
        norm = next((a.s for a in node.attribute if a.name == "norm"), b"")
        return norm == b"L1"
    return False


def _rows_are_probabilities(values: Array) -> bool:
    rows = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return bool(
        (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, rtol=0, atol=SUM_TOLERANCE)
    )


def _same_shape(a: list[int], b: list[int]) -> bool:
    if len(a) != len(b):
        return False
    return all(x == y or -1 in (x, y) for x, y in zip(a[1:], b[1:], strict=True))


def _cast(array: Array, spec: TensorSpec, path: Path) -> Array:
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BYTES":
        return np.asarray(array, dtype=object)
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise IncomparablePair(
            f"sample {path.name}: {spec.name!r} is {array.dtype} but the input is {spec.datatype}"
        )
    return np.ascontiguousarray(array, dtype=dtype)


def _class_indices(labels: Array, path: Path) -> Array:
    # Labels are class indices 0..C-1, as the feedback API takes them; a float column read
    # from a CSV holds whole numbers.
    if labels.dtype.kind in "iu" or (labels.dtype.kind == "f" and np.all(labels == labels // 1)):
        return labels.astype(np.int64)
    raise IncomparablePair(f"sample {path.name}: labels must be class indices 0..C-1")


def _table(path: Path, input_name: str) -> tuple[dict[str, Array], Array | None]:
    import pandas as pd  # the `drift` extra; only tables need it

    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    label_column = next((c for c in LABEL_COLUMNS if c in frame.columns), None)
    labels = None if label_column is None else frame.pop(label_column).to_numpy()
    return {input_name: frame.to_numpy()}, labels


def _copy(source: Path, target: Path) -> Path:
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target
