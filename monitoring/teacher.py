"""Teacher backends behind one interface: a local ONNX model, or a remote OIP endpoint.

    Teacher (protocol): name, version, async infer({input name: [N, ...]}) -> scores [N, ...],
                        async aclose()
    ├── LocalOnnxTeacher   onnxruntime on a dedicated single worker thread
    └── RemoteOipTeacher   Open Inference Protocol (KServe V2) JSON over an injected httpx client,
                           also on a dedicated single worker thread

Both keep their work off the event loop on a thread at the lowest CPU priority: the loop only
awaits a future. For the remote teacher that matters even though the call is I/O: encoding a
64-row batch, httpx's own Python and decoding the answer held the loop for milliseconds per
batch, and with a slow teacher that showed in the student's p95 (docs/benchmarks.md).

A batch is every input of the student's requests, by the student's input names, each an array of
any dtype and rank with the rows first; `input_map` renames those the teacher calls differently
(student name -> teacher name). The answer is the teacher's scores output (class logits or
probabilities, or regression values) as float32, rows first.

Every failure (transport, status, malformed or non-finite answer, wrong row count) is raised as
`TeacherError`, so the shadow worker has one thing to count and feed to its circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx
import numpy as np
import onnxruntime as ort
import orjson
from numpy.typing import NDArray

from kdgate.monitoring.deadline import total_deadline
from kdgate.monitoring.priority import lowest_thread_priority

Scores = NDArray[np.float32]
Inputs = Mapping[str, NDArray[Any]]
# Far above any batch of logits in JSON (64 rows x 1,000 classes is ~1.5 MB); a bound, so a
# misbehaving teacher cannot fill the gateway's memory within its deadline.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# An execution provider as `ort.InferenceSession(providers=...)` takes it: name, or name + options.
Provider = str | tuple[str, dict[str, Any]]


class TeacherError(Exception):
    """The teacher did not produce usable scores for a batch."""


class Teacher(Protocol):
    """A teacher model: scores for a batch of rows of every input."""

    name: str
    version: str

    async def infer(self, batch: Inputs) -> Scores:
        """Scores float32 [N, ...] for `batch` ({student input name: [N, ...]}); raises
        TeacherError."""
        ...

    async def aclose(self) -> None:
        """Release what the teacher owns (threads, sessions); not injected clients."""
        ...


class LocalOnnxTeacher:
    """An ONNX teacher run by onnxruntime on its own single worker thread.

    Built from the model BYTES (the caller verifies them against the model card first), so this
    module never reads files or imports service/. Constructing it loads the model, which blocks:
    build it at startup (or via `asyncio.to_thread`), not on a request.

    Runs are serialised on one dedicated thread, so a slow teacher queues batches instead of
    occupying the default executor the student may use, and the event loop never waits.
    `intra_op_threads` is the teacher's own onnxruntime thread count (default 1);
    `session_options` and `providers`, when given, are what its session is built with (the
    caller checks the providers are available: onnxruntime would fall back to the CPU).

    Each input of a batch is fed under its student name, or `input_map[name]` when mapped, as
    it is: the caller checks that the teacher declares the same datatypes as the student, whose
    signature the requests were validated against. `output_name` is the teacher's scores output.
    """

    def __init__(
        self,
        model: bytes,
        *,
        name: str,
        version: str,
        output_name: str = "logits",
        input_map: Mapping[str, str] | None = None,
        intra_op_threads: int = 1,
        session_options: ort.SessionOptions | None = None,
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
    ) -> None:
        self.name = name
        self.version = version
        self.output_name = output_name
        self.input_map = dict(input_map or {})
        self._session = teacher_session(model, intra_op_threads, session_options, providers)
        # The teacher thread runs at the lowest CPU priority: with one intra-op thread the model
        # runs on it, and requests on the same core must not wait for a shadow comparison.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"teacher-{name}", initializer=lowest_thread_priority
        )

    async def infer(self, batch: Inputs) -> Scores:
        """Scores float32 [N, ...] for `batch` ({student input name: [N, ...]}), computed on the
        teacher thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, batch)

    async def aclose(self) -> None:
        """Stop the worker thread once the run in progress (if any) has finished."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def _run(self, batch: Inputs) -> Scores:
        feed = {self.input_map.get(n, n): np.ascontiguousarray(a) for n, a in batch.items()}
        try:
            (out,) = self._session.run([self.output_name], feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise TeacherError(f"teacher {self.name} failed: {exc}") from exc
        return checked_scores(out, batch_rows(batch))


class RemoteOipTeacher:
    """A teacher behind an Open Inference Protocol (KServe V2) REST endpoint.

    `client` is injected (tests pass `httpx.MockTransport` or a real local server) and is not
    closed by `aclose`; it is used from one worker thread of this teacher's (started on the first
    `infer`, at the lowest priority; the caller's contextvars, e.g. the current trace span, are
    carried over to it). Each `infer` is one `POST {url}/v2/models/{model}[/versions/{v}]/infer`
    with every input of the batch as one tensor of its V2 datatype (`input_datatypes`, by student
    input name, as the student's card declares them; default: one FP32 `input`, the digits
    signature; JSON), named as `input_map` says, else by
    the student's name, asking for `output_name` only, ending within
    `timeout_seconds` in total, however slowly the teacher answers, when the client's transport is a
    `monitoring.deadline.DeadlineTransport` (service/monitoring_runtime.py builds it so; on another
    transport it bounds each socket operation only). So a trickling teacher holds the thread for one
    timeout per batch, shadowing resumes with the next batch once it recovers, and `aclose` returns
    within one timeout. Answers over `MAX_ANSWER_BYTES` are refused. `version` is what the teacher
    reports as its version; when `model_version` is set, the request is pinned to that version on
    the remote side.
    """

    def __init__(
        self,
        client: httpx.Client,
        *,
        url: str,
        model: str,
        version: str = "remote",
        model_version: str | None = None,
        output_name: str = "logits",
        input_datatypes: Mapping[str, str] | None = None,
        input_map: Mapping[str, str] | None = None,
        timeout_seconds: float = 2.0,
    ) -> None:
        self.name = model
        self.version = version
        self.output_name = output_name
        self.input_datatypes = dict(input_datatypes or {"input": "FP32"})
        self.input_map = dict(input_map or {})
        self._client = client
        path = f"/v2/models/{model}" + (f"/versions/{model_version}" if model_version else "")
        self._endpoint = url.rstrip("/") + path + "/infer"
        self._timeout_seconds = timeout_seconds
        self._timeout = httpx.Timeout(timeout_seconds)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"teacher-{model}", initializer=lowest_thread_priority
        )

    async def infer(self, batch: Inputs) -> Scores:
        """Scores float32 [N, ...] for `batch` ({student input name: [N, ...]}) from the remote
        teacher."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, self._infer, batch)

    async def aclose(self) -> None:
        """Stop the worker thread once the call in progress (if any) has finished; the client
        belongs to the caller."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def _infer(self, batch: Inputs) -> Scores:
        body = {
            "inputs": [
                v2_json_tensor(self.input_map.get(name, name), self._datatype(name), rows)
                for name, rows in batch.items()
            ],
            "outputs": [{"name": self.output_name}],
        }
        try:
            with (
                total_deadline(self._timeout_seconds),
                self._client.stream(
                    "POST",
                    self._endpoint,
                    content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                    headers={"content-type": "application/json"},
                    timeout=self._timeout,
                ) as response,
            ):
                content = self._read(response)
        except httpx.HTTPError as exc:
            raise TeacherError(f"teacher {self._endpoint}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            text = content[:200].decode(errors="replace")
            raise TeacherError(f"teacher {self._endpoint} answered {response.status_code}: {text}")
        return checked_scores(self._output(content), batch_rows(batch))

    def _datatype(self, name: str) -> str:
        datatype = self.input_datatypes.get(name)
        if datatype is None:
            raise TeacherError(f"teacher {self._endpoint}: no datatype known for input {name!r}")
        return datatype

    def _read(self, response: httpx.Response) -> bytes:
        """The answer's body, refusing one over `MAX_ANSWER_BYTES`."""
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise TeacherError(
                    f"teacher {self._endpoint}: answer over {MAX_ANSWER_BYTES} bytes refused"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _output(self, content: bytes) -> NDArray[Any]:
        try:
            outputs = orjson.loads(content)["outputs"]
            tensor = next(o for o in outputs if o["name"] == self.output_name)
            return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, StopIteration) as exc:
            raise TeacherError(
                f"teacher {self._endpoint}: no usable output {self.output_name!r}: {exc!r}"
            ) from exc


def teacher_session(
    model: bytes,
    intra_op_threads: int,
    options: ort.SessionOptions | None = None,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """The onnxruntime session of a local teacher (blocking: it loads the model)."""
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning intra-op threads burn a core between batches; that core serves the student.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))


def v2_json_tensor(name: str, datatype: str, rows: NDArray[Any]) -> dict[str, Any]:
    """One input tensor of a V2 JSON request: name, shape, datatype and the flat data
    (serialised by orjson's numpy support; FP16 sent as JSON numbers, BYTES as UTF-8 strings)."""
    array = np.asarray(rows)
    data: Any = np.ascontiguousarray(array).reshape(-1)
    if datatype == "FP16":
        data = data.astype(np.float32)  # orjson serialises no float16
    elif datatype == "BYTES":
        data = [v.decode() if isinstance(v, bytes) else str(v) for v in data.tolist()]
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def batch_rows(batch: Inputs) -> int:
    """Rows of a batch: the leading dimension its inputs share; TeacherError if they differ."""
    rows = {len(a) for a in batch.values()}
    if len(rows) != 1:
        raise TeacherError(f"inputs of one batch differ in rows: {sorted(rows)}")
    return rows.pop()


def checked_scores(out: Any, rows: int) -> Scores:
    """`out` as float32 [rows, ...] scores; TeacherError if it has not `rows` rows, is empty or
    is not finite."""
    scores = np.asarray(out, dtype=np.float32)
    if scores.ndim == 0 or scores.shape[0] != rows or scores.size == 0:
        raise TeacherError(f"teacher returned shape {scores.shape} for {rows} rows")
    if not np.isfinite(scores).all():
        raise TeacherError("teacher returned non-finite scores")
    return scores
