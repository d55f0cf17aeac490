"""The Tinker API's protobuf messages, to and from plain Python: a `forward_backward` request in,
its `ForwardBackwardOutput` and a sample's `SampleResponse` out.

The schema is the one the `tinker` SDK ships (`tinker.proto.tinker_public_pb2`), so the server
and every client agree by construction. Token arrays travel as little-endian bytes: int32 for
model-input tokens, a `Tensor` (dense or CSR; float32 or int64) for each loss input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Datum",
    "ForwardBackwardCall",
    "WireError",
    "decode_forward_backward",
    "encode_forward_backward_output",
    "encode_sample_response",
]

TINKER_INSTALL_HINT = (
    'rollouts serve needs the tinker SDK, starlette and uvicorn: pip install "rollouts[serve]"'
)
_DTYPES = {1: np.float32, 2: np.int64, 3: np.int32}  # tinker_public.DType; bfloat16 refused
MAX_TENSOR_VALUES = 1 << 26  # the most values one loss input may claim


class WireError(ValueError):
    """A request that does not decode: the client's mistake (a `user` error)."""


def proto() -> Any:
    try:
        from tinker.proto import tinker_public_pb2
    except ImportError as error:
        raise ImportError(TINKER_INSTALL_HINT) from error
    return tinker_public_pb2


@dataclass(frozen=True)
class Datum:
    """One sequence: its model-input tokens [N] and its loss inputs, each [N]."""

    tokens: np.ndarray  # int64 [N]
    inputs: dict[str, np.ndarray]  # target_tokens int64 [N]; weights, logprobs, advantages [N]


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float | str]
    forward_only: bool
    data: list[Datum]


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """A `ForwardBackwardRequest` (already decompressed) as a `ForwardBackwardCall`."""
    pb = proto()
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as error:  # protobuf raises its own DecodeError
        raise WireError(
            f"forward_backward: the body is not a ForwardBackwardRequest ({error})"
        ) from None
    config: dict[str, float | str] = dict(request.loss_fn_config)
    for key, value in request.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    data = [_datum(index, datum) for index, datum in enumerate(request.data)]
    if not data:
        raise WireError("forward_backward: the request holds no datum")
    return ForwardBackwardCall(
        model_id=request.model_id,
        seq_id=int(request.seq_id),
        loss_fn=request.loss_fn,
        loss_config=config,
        forward_only=bool(request.forward_only),
        data=data,
    )


def _datum(index: int, datum: Any) -> Datum:
    pieces = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"data[{index}]: a {kind} chunk; only encoded_text is served")
        try:
            pieces.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").astype(np.int64))
        except ValueError as error:
            raise WireError(f"data[{index}]: model-input tokens: {error}") from None
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if tokens.size == 0:
        raise WireError(f"data[{index}]: empty model input")
    inputs = {name: _tensor(f"data[{index}].{name}", t) for name, t in datum.loss_fn_inputs.items()}
    for name, array in inputs.items():
        if array.shape != tokens.shape:
            raise WireError(
                f"data[{index}].{name} has shape {list(array.shape)}; expected "
                f"[{tokens.size}], one value per model-input token"
            )
    return Datum(tokens=tokens, inputs=inputs)


def _tensor(where: str, tensor: Any) -> np.ndarray:
    dtype = _DTYPES.get(int(tensor.dtype))
    if dtype is None:
        raise WireError(f"{where}: dtype {tensor.dtype} is not served (float32, int64, int32)")
    shape = [int(n) for n in tensor.shape]
    if any(n < 0 for n in shape) or math.prod(shape) > MAX_TENSOR_VALUES:
        raise WireError(f"{where}: shape {shape} is negative or too large")
    try:
        return _tensor_values(where, tensor, dtype, shape)
    except (ValueError, IndexError) as error:  # a buffer of the wrong size, an index too far
        raise WireError(f"{where}: {error}") from None


def _tensor_values(where: str, tensor: Any, dtype: Any, shape: list[int]) -> np.ndarray:
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        values = np.frombuffer(csr.values, dtype=np.dtype(dtype).newbyteorder("<"))
        crow = np.frombuffer(csr.crow_indices, dtype="<i8")
        cols = np.frombuffer(csr.col_indices, dtype="<i8")
        if len(shape) != 2 or len(crow) != shape[0] + 1:
            raise WireError(f"{where}: a CSR tensor of shape {shape} with {len(crow)} row indices")
        dense = np.zeros(shape, dtype=dtype)
        for row in range(shape[0]):
            dense[row, cols[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
        return dense.reshape(-1) if shape[0] == 1 else dense
    array = np.frombuffer(tensor.dense, dtype=np.dtype(dtype).newbyteorder("<"))
    if shape and math.prod(shape) != array.size:
        raise WireError(f"{where}: shape {shape} but {array.size} values")
    return array.reshape(shape) if shape else array


def encode_forward_backward_output(
    outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]
) -> bytes:
    """One `ArrayRecord` holding every datum's float32 outputs (byte offsets per datum)."""
    pb = proto()
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in outputs[0] if outputs else ():
        arrays = [np.ascontiguousarray(out[name], dtype="<f4").reshape(-1) for out in outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.astype("<i8").tobytes()
        field.dtype = 1  # DTYPE_FLOAT32
    for key, value in metrics.items():
        assert key.count(":") == 1, f"a Tinker metric key holds exactly one ':', got {key!r}"
        message.metrics[key] = float(value)
    return message.SerializeToString()


def encode_sample_response(
    sequences: list[tuple[list[int], list[float], str]], prompt_logprobs: list[float] | None
) -> bytes:
    """`SampleResponse`: per sequence (tokens, logprobs, "stop" | "length"); prompt log-probs
    (NaN for the first token) when asked for."""
    pb = proto()
    message = pb.SampleResponse()
    for tokens, logprobs, reason in sequences:
        sequence = message.sequences.add()
        sequence.tokens = np.asarray(tokens, dtype="<i4").tobytes()
        sequence.logprobs = np.asarray(logprobs, dtype="<f4").tobytes()
        sequence.stop_reason = 1 if reason == "length" else 0
    if prompt_logprobs is not None:
        message.prompt_logprobs = np.asarray(prompt_logprobs, dtype="<f4").tobytes()
    return message.SerializeToString()
