"""Four teacher/student pair families built locally (no downloads), for `kdgate import` tests.

Each builder writes into a directory and returns a `Pair`: the two ONNX files, a sample (.npz,
one array per input name plus `labels`) and a shifted sample of the same shape whose inputs have
moved (for drift). Builds take a few seconds; tests cache them per session.

- digits: the shipped `models/digits` pair (input [N, 64] FP32, logits).
- tabular: a scikit-learn MLP teacher and logistic-regression student on a `make_classification`
  table, converted with skl2onnx (`zipmap: False`), as users export theirs: a `label` [N] INT64
  and a `probabilities` [N, C] FP32 output. The same fitted models in the other output kind
  (raw scores named `logits`, no softmax) are written out with `onnx.helper`, since skl2onnx
  offers raw scores for linear models only.
- text: torch embedding classifiers over INT64 `input_ids` + `attention_mask` [N, L].
- images: torch CNNs over [N, 3, 16, 16] FP32.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"
OPSET = 17


@dataclass(frozen=True)
class Pair:
    """A built pair: ONNX files, a sample and a shifted sample (both .npz with `labels`)."""

    family: str
    teacher: Path
    student: Path
    sample: Path
    shifted: Path
    inputs: tuple[str, ...]
    scores: str
    classes: int


def _save_sample(path: Path, inputs: dict[str, np.ndarray], labels: np.ndarray) -> Path:
    np.savez(path, **inputs, labels=labels.astype(np.int64))
    return path


def build_digits(out: Path) -> Pair:
    """The shipped digits pair; the sample is the committed reference split, the shifted one
    the same digits inverted (16 - pixel)."""
    out.mkdir(parents=True, exist_ok=True)
    with np.load(DIGITS / "reference.npz") as ref:
        x, y = ref["inputs"].astype(np.float32), ref["labels"]
    return Pair(
        family="digits",
        teacher=DIGITS / "teacher.onnx",
        student=DIGITS / "student-v1.onnx",
        sample=_save_sample(out / "sample.npz", {"input": x}, y),
        shifted=_save_sample(out / "shifted.npz", {"input": 16.0 - x}, y),
        inputs=("input",),
        scores="logits",
        classes=10,
    )


# -- tabular: scikit-learn, converted by hand as skl2onnx does -----------------------------------

TABLE_INPUT = "float_input"  # skl2onnx's usual input name


def build_tabular(out: Path, *, logits: bool = False, seed: int = 0) -> Pair:
    """MLP teacher, logistic-regression student on a 4-class, 12-feature table.

    `logits=True` converts the same fitted models with raw scores (no softmax) in
    `probabilities`' place, under the name `logits`: the same pair in the other output kind.
    """
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    out.mkdir(parents=True, exist_ok=True)
    x, y = make_classification(
        n_samples=1600, n_features=12, n_informative=8, n_classes=4, random_state=seed
    )
    x = x.astype(np.float32)
    train, test = slice(0, 1200), slice(1200, None)
    # One thread: on a shared machine BLAS threads only add contention for matrices this small.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence warnings: a few iterations are enough
        teacher = MLPClassifier((32, 32), max_iter=60, random_state=seed).fit(x[train], y[train])
        student = LogisticRegression(max_iter=100).fit(x[train], y[train])
    scores = "logits" if logits else "probabilities"
    if logits:
        _save_model(out / "teacher.onnx", _mlp_graph(teacher, logits))
        _save_model(out / "student.onnx", _linear_graph(student, logits))
    else:
        _save_model(out / "teacher.onnx", _skl2onnx(teacher, x.shape[1]))
        _save_model(out / "student.onnx", _skl2onnx(student, x.shape[1]))
    rng = np.random.default_rng(seed)
    shifted = x[test] * 1.5 + rng.normal(2.0, 0.5, size=x[test].shape).astype(np.float32)
    return Pair(
        family="tabular",
        teacher=out / "teacher.onnx",
        student=out / "student.onnx",
        sample=_save_sample(out / "sample.npz", {TABLE_INPUT: x[test]}, y[test]),
        shifted=_save_sample(out / "shifted.npz", {TABLE_INPUT: shifted}, y[test]),
        inputs=(TABLE_INPUT,),
        scores=scores,
        classes=4,
    )


def _skl2onnx(clf: object, n_features: int) -> onnx.ModelProto:
    """`clf` as skl2onnx converts it: `label` + `probabilities` (a tensor, not a ZipMap)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model: onnx.ModelProto = convert_sklearn(
        clf,
        initial_types=[(TABLE_INPUT, FloatTensorType([None, n_features]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    return model


def _table_io(n_features: int, classes: int, scores: str) -> tuple[list, list]:  # type: ignore[type-arg]
    inputs = [helper.make_tensor_value_info(TABLE_INPUT, TensorProto.FLOAT, [None, n_features])]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_tensor_value_info(scores, TensorProto.FLOAT, [None, classes]),
    ]
    return inputs, outputs


def _mlp_graph(clf: object, logits: bool) -> onnx.ModelProto:
    weights, biases = clf.coefs_, clf.intercepts_  # type: ignore[attr-defined]
    nodes, inits, current = [], [], TABLE_INPUT
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"B{i}"], [f"z{i}"]),
        ]
        current = f"z{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    scores = "logits" if logits else "probabilities"
    if logits:
        nodes.append(helper.make_node("Identity", [current], [scores]))
    else:
        nodes.append(helper.make_node("Softmax", [current], [scores], axis=1))
    nodes.append(helper.make_node("ArgMax", [current], ["label"], axis=1, keepdims=0))
    inputs, outputs = _table_io(weights[0].shape[0], weights[-1].shape[1], scores)
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _linear_graph(clf: object, logits: bool) -> onnx.ModelProto:
    coef, intercept = clf.coef_, clf.intercept_  # type: ignore[attr-defined]
    classes = coef.shape[0]
    scores = "logits" if logits else "probabilities"
    node = helper.make_node(
        "LinearClassifier",
        [TABLE_INPUT],
        ["label", scores],
        domain="ai.onnx.ml",
        coefficients=coef.astype(np.float32).ravel().tolist(),
        intercepts=intercept.astype(np.float32).tolist(),
        classlabels_ints=list(range(classes)),
        multi_class=1,
        post_transform="NONE" if logits else "SOFTMAX",
    )
    inputs, outputs = _table_io(coef.shape[1], classes, scores)
    graph = helper.make_graph([node], "logreg", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _save_model(path: Path, model: onnx.ModelProto) -> None:
    model.ir_version = 8  # onnxruntime 1.18+ reads IR 8 whatever onnx's default is
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# -- torch families ---------------------------------------------------------------------------

SEQ_LEN = 16
VOCAB = 256
TEXT_CLASSES = 4
IMAGE_SHAPE = (3, 16, 16)
IMAGE_CLASSES = 3


def build_text(out: Path, *, seed: int = 0) -> Pair:
    """Embedding classifiers over [N, 16] token ids with an attention mask; 4 topics, each
    drawing most tokens from its own band of a 256-token vocabulary, padded with id 0."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def texts(n: int, shift: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = rng.integers(0, TEXT_CLASSES, n)
        lengths = rng.integers(4, SEQ_LEN + 1, n)
        band = 1 + labels[:, None] * 60 + rng.integers(0, 60, (n, SEQ_LEN))
        noise = rng.integers(1, VOCAB, (n, SEQ_LEN))
        topical = rng.random((n, SEQ_LEN)) < (0.3 if shift else 0.6)
        ids = np.where(topical, band, noise)
        if shift:  # a new slice of the vocabulary appears: the top tokens, unseen in training
            ids = np.where(rng.random((n, SEQ_LEN)) < 0.4, rng.integers(241, VOCAB, ids.shape), ids)
        mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.int64)
        return (ids * mask).astype(np.int64), mask, labels

    class Bag(torch.nn.Module):
        def __init__(self, dim: int, hidden: int) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, dim)
            layers: list[torch.nn.Module] = [torch.nn.Linear(dim, hidden), torch.nn.ReLU()]
            self.head = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, TEXT_CLASSES))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.to(torch.float32).unsqueeze(-1)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled)

    ids, mask, labels = texts(2400)
    teacher, student = Bag(32, 64), Bag(4, 8)
    _fit(teacher, (ids[:1800], mask[:1800]), labels[:1800], epochs=5)
    _fit(student, (ids[:1800], mask[:1800]), labels[:1800], epochs=3)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    names = ["input_ids", "attention_mask"]
    _export(teacher, example, names, out / "teacher.onnx")
    _export(student, example, names, out / "student.onnx")
    s_ids, s_mask, s_labels = texts(600, shift=True)
    return Pair(
        family="text",
        teacher=out / "teacher.onnx",
        student=out / "student.onnx",
        sample=_save_sample(
            out / "sample.npz",
            {"input_ids": ids[1800:], "attention_mask": mask[1800:]},
            labels[1800:],
        ),
        shifted=_save_sample(
            out / "shifted.npz", {"input_ids": s_ids, "attention_mask": s_mask}, s_labels
        ),
        inputs=tuple(names),
        scores="logits",
        classes=TEXT_CLASSES,
    )


def build_images(out: Path, *, seed: int = 0) -> Pair:
    """CNNs over [N, 3, 16, 16] noisy images of a horizontal bar, a vertical bar or a
    diagonal, one colour channel each; the shifted sample is brighter and noisier."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def images(n: int, shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, IMAGE_CLASSES, n)
        x = rng.normal(0.0, 0.7 if shift else 0.5, (n, *IMAGE_SHAPE)).astype(np.float32)
        at = rng.integers(3, 13, n)
        for i, (label, k) in enumerate(zip(labels, at, strict=True)):
            if label == 0:
                x[i, 0, k, :] += 1.0
            elif label == 1:
                x[i, 1, :, k] += 1.0
            else:
                x[i, 2][np.eye(16, k=int(k) - 8, dtype=bool)] += 1.0
        return (x + (0.3 if shift else 0.0)).astype(np.float32), labels

    def cnn(width: int, hidden: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(width * 4, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, IMAGE_CLASSES),
        )

    x, labels = images(1400)
    teacher, student = cnn(8, 32), cnn(3, 8)
    _fit(teacher, (x[:1000],), labels[:1000], epochs=5)
    _fit(student, (x[:1000],), labels[:1000], epochs=4)
    example = (torch.from_numpy(x[:2]),)
    _export(teacher, example, ["images"], out / "teacher.onnx")
    _export(student, example, ["images"], out / "student.onnx")
    shifted, s_labels = images(400, shift=True)
    return Pair(
        family="images",
        teacher=out / "teacher.onnx",
        student=out / "student.onnx",
        sample=_save_sample(out / "sample.npz", {"images": x[1000:]}, labels[1000:]),
        shifted=_save_sample(out / "shifted.npz", {"images": shifted}, s_labels),
        inputs=("images",),
        scores="logits",
        classes=IMAGE_CLASSES,
    )


def _fit(model: object, inputs: tuple[np.ndarray, ...], labels: np.ndarray, epochs: int) -> None:
    import torch

    assert isinstance(model, torch.nn.Module)
    tensors = [torch.from_numpy(a) for a in inputs]
    target = torch.from_numpy(labels.astype(np.int64))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread only adds contention
    try:
        model.train()
        for _ in range(epochs):
            for start in range(0, len(target), 64):
                batch = [t[start : start + 64] for t in tensors]
                loss = torch.nn.functional.cross_entropy(model(*batch), target[start : start + 64])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def _export(model: object, example: tuple[object, ...], names: list[str], path: Path) -> None:
    """torch -> ONNX with a dynamic batch axis, as distill/export.py exports (TorchScript
    exporter: the dynamo one needs onnxscript)."""
    import torch

    assert isinstance(model, torch.nn.Module)
    axes = {name: {0: "batch"} for name in [*names, "logits"]}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        staged = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            example,
            staged,
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
        )
        path.write_bytes(staged.read_bytes())


BUILDERS = {
    "digits": build_digits,
    "tabular": build_tabular,
    "text": build_text,
    "images": build_images,
}


class PairCache:
    """Pairs built once per test session, on first use, under one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, bool], Pair] = {}

    def get(self, family: str, *, logits: bool = False) -> Pair:
        """The pair of `family` (`logits=True`: the tabular pair with raw-score outputs)."""
        key = (family, logits)
        if key not in self._built:
            out = self.root / (family + ("-logits" if logits else ""))
            self._built[key] = build_tabular(out, logits=True) if logits else BUILDERS[family](out)
        return self._built[key]
