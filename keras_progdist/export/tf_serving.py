"""TF Serving's own files: the warm-up records of a version folder and the
`models.config` that lists every stage of an export. Needs the tensorflow-serving-api
protos (imported when called, so importing this module needs no TensorFlow).
"""

from __future__ import annotations

import os
import re

import numpy as np

from keras_progdist import fileio
from keras_progdist.export.settings import SERVING_ROOT
from keras_progdist.workdir import GUIDANCE

SERVING_API_INSTALL = "pip install --no-deps tensorflow-serving-api==2.21.0"
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def serving_apis():
    """The tensorflow-serving-api protos: `(predict_pb2, prediction_log_pb2,
    model_server_config_pb2)`; ImportError with the install line if missing."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError as e:
        raise ImportError(
            "Writing TF Serving warm-up requests and models.config needs the protos of "
            f"tensorflow-serving-api ({e}). It declares a dependency on full `tensorflow`, "
            f"so install it without deps next to tensorflow-cpu: `{SERVING_API_INSTALL}`."
        ) from e
    return predict_pb2, prediction_log_pb2, model_server_config_pb2


def write_warmup_requests(saved_model_dir: str, serving_name: str, num_classes=None,
                          batch_sizes=(1,), guided: bool = False) -> str:
    """Writes `assets.extra/tf_serving_warmup_requests` (TFRecord of `PredictionLog`s).

    One `serving_default` request per batch size, seeds `0..B-1` (labels `i % classes`,
    guidance 0 for a guided model).
    TF Serving replays them when it loads the version, before the first real request.

    Args:
        saved_model_dir: the (temporary) version folder.
        serving_name: the TF Serving model name the requests address.
        num_classes: the class count of a class-conditional model, else None.
        batch_sizes: one request per size.
        guided: the model's signatures take `guidance`.

    Returns:
        The file's path.
    """
    import tensorflow as tf

    predict_pb2, prediction_log_pb2, _ = serving_apis()
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = serving_name
            request.model_spec.signature_name = "serving_default"
            request.inputs["seed"].CopyFrom(
                tf.make_tensor_proto(np.arange(batch, dtype=np.int32)))
            if num_classes:
                request.inputs["label"].CopyFrom(tf.make_tensor_proto(
                    np.arange(batch, dtype=np.int32) % num_classes))
            if guided:
                request.inputs["guidance"].CopyFrom(tf.make_tensor_proto(
                    np.zeros((batch,), np.float32)))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def write_models_config(root: str, name: str, serving_root: str = SERVING_ROOT) -> str:
    """`<root>/models.config` listing every `<name>-<N>steps` (and guided stage one's
    `<name>-guidance-<N>steps`) model found under `root`, most steps first.

    `base_path` is where the server sees each model: `<serving_root>/<name>/<model>`
    (the export dir mounted at `/models` in the `tensorflow/serving` container). The
    file is rewritten only when its text changes, so an up-to-date export touches
    nothing a server watches.

    Returns:
        The file's path.
    """
    from google.protobuf import text_format

    _, _, model_server_config_pb2 = serving_apis()
    pattern = re.compile(rf"^{re.escape(name)}-(?:{GUIDANCE}-)?(\d+)steps$")
    found = sorted((int(m.group(1)), entry) for entry in os.listdir(root)
                   if (m := pattern.match(entry)) and os.path.isdir(os.path.join(root, entry)))
    config = model_server_config_pb2.ModelServerConfig()
    for _, entry in sorted(found, reverse=True):
        model = config.model_config_list.config.add()
        model.name = entry
        model.base_path = f"{serving_root.rstrip('/')}/{name}/{entry}"
        model.model_platform = "tensorflow"
    path = os.path.join(root, MODELS_CONFIG)
    text = text_format.MessageToString(config)
    if _read_text(path) != text:
        fileio.atomic_write_text(path, text)
    return path


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
