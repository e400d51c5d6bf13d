"""Render the interface description (`interface.py`) as Triton's ModelConfig protobuf, with every `${name}`
placeholder filled from `values`: the `config.pbtxt` files `fill-model-repo` writes and the ModelConfig /
ModelMetadata `serve` answers are both made here."""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.repository.spec import WIRE_TYPES, Model, Tensor

PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def fill(text: str, values: dict[str, str], where: str) -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise BdLoraError(f"{where}: no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def data_type(t: Tensor, values: dict[str, str], where: str = "") -> str:
    """The TYPE_* name of a tensor, placeholders filled."""
    name = fill(t.data_type, values, f"{where}{t.name}")
    if name not in WIRE_TYPES:
        raise BdLoraError(f"{where}{t.name}: data type must be one of {', '.join(WIRE_TYPES)}, got {name!r}")
    return name


def wire_type(t: Tensor, values: dict[str, str]) -> str:
    return WIRE_TYPES[data_type(t, values)]


def _int(text: str, values: dict[str, str], where: str) -> int:
    value = fill(text, values, where)
    if not value.lstrip("-").isdigit():
        raise BdLoraError(f"{where}: expected an integer, got {value!r}")
    return int(value)


def model_config(model: Model, values: dict[str, str]) -> mc.ModelConfig:
    where = f"{model.name}: "
    config = mc.ModelConfig(name=model.name, backend=fill(model.backend, values, where + "backend"), platform=model.platform,
                            max_batch_size=_int("${triton_max_batch_size}", values, where + "max_batch_size"))
    for t in model.inputs:
        i = config.input.add(name=t.name, data_type=mc.DataType.Value(data_type(t, values, where)), dims=t.dims,
                             optional=t.optional, allow_ragged_batch=t.ragged)
        if t.scalar:
            i.reshape.SetInParent()
    for t in model.outputs:
        config.output.add(name=t.name, data_type=mc.DataType.Value(data_type(t, values, where)), dims=t.dims)
    if model.decoupled:
        config.model_transaction_policy.decoupled = fill("${decoupled_mode}", values, where).lower() in ("true", "1")
    if model.dynamic_batching:
        config.dynamic_batching.SetInParent()
        if model.queue_policy:
            config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = _int("${max_queue_delay_microseconds}", values, where)
            config.dynamic_batching.default_queue_policy.max_queue_size = _int("${max_queue_size}", values, where)
    if model.instance_count:
        config.instance_group.add(count=_int(model.instance_count, values, where + "instance count"),
                                  kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in model.parameters.items():
        config.parameters[key].string_value = fill(value, values, where + key)
    for step in model.steps:
        s = config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        s.input_map.update(step.inputs)
        s.output_map.update(step.outputs)
    return config


def model_metadata(model: Model, values: dict[str, str]) -> dict:
    """KServe v2 model metadata (as a dict: the HTTP JSON, and the fields of the gRPC message)."""
    def tensors(ts):
        return [{"name": t.name, "datatype": wire_type(t, values), "shape": [-1, *t.dims]} for t in ts]

    return {"name": model.name, "versions": ["1"], "platform": model.platform or fill(model.backend, values, model.name),
            "inputs": tensors(model.inputs), "outputs": tensors(model.outputs)}


def triton_normalized(configs: dict[str, mc.ModelConfig]) -> dict[str, mc.ModelConfig]:
    """The configs as Triton answers ModelConfig for them once loaded (model_config_utils NormalizeModelConfig and the
    ensemble's validation): version policy latest 1; for backends, pinned input / output memory, instance group names
    `<model>_<i>`, dynamic batching's preferred batch size defaulting to max_batch_size, `model.py` as the Python
    backend's file; an ensemble is decoupled when one of its steps is."""
    out = {}
    for name, config in configs.items():
        c = mc.ModelConfig()
        c.CopyFrom(config)
        if not c.HasField("version_policy"):
            c.version_policy.latest.num_versions = 1
        if c.platform != "ensemble":
            c.optimization.input_pinned_memory.enable = True
            c.optimization.output_pinned_memory.enable = True
            for i, group in enumerate(c.instance_group):
                group.name = group.name or f"{name}_{i}"
            if c.HasField("dynamic_batching") and not c.dynamic_batching.preferred_batch_size and c.max_batch_size > 0:
                c.dynamic_batching.preferred_batch_size.append(c.max_batch_size)
            if c.backend == "python" and not c.default_model_filename:
                c.default_model_filename = "model.py"
        elif any(configs[s.model_name].model_transaction_policy.decoupled
                 for s in c.ensemble_scheduling.step if s.model_name in configs):
            c.model_transaction_policy.decoupled = True
        out[name] = c
    return out


def triton_json(message) -> dict:
    """A protobuf message as Triton's HTTP endpoints write it: every field, defaults included, under its proto name,
    64-bit integers as JSON numbers (protobuf's own JSON writes them as strings)."""
    from google.protobuf import json_format

    doc = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, doc)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _numbers(descriptor, doc: dict) -> dict:
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                doc[field.name] = {k: _numbers(value_field.message_type, v) for k, v in value.items()}
            elif value_field.type in _INT64:
                doc[field.name] = {k: int(v) for k, v in value.items()}
        elif field.message_type is not None:
            doc[field.name] = [_numbers(field.message_type, v) for v in value] if isinstance(value, list) \
                else _numbers(field.message_type, value)
        elif field.type in _INT64:
            doc[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return doc
