"""mergekit's YAML, in and out: a mergekit merge config read as a Mergeflow merge (method, parameters, base and
experts) with mergekit's meaning, and a Mergeflow merge written back as the equivalent mergekit YAML.

Read: `merge_method`, `base_model`, `models` (each with `parameters`), `parameters`, `dtype`, `out_dtype`,
`tokenizer_source` (none or "base": the base's tokenizer is copied, as for every merge) and `slices` that take every
layer of whole models (one slice, each source over [0, the model's layer count]). Everything else (`modules`, partial
slices, `tokenizer`, `chat_template`, other tokenizer sources, methods Mergeflow lacks, LoRA `model+adapter`
references over another model, hub ids) fails before any work, naming the field. Mergekit's defaults are written
out (its density 1.0, lambda 1.0, each method's normalize and rescale), since Mergeflow's own defaults differ.
Mergeflow computes in fp32 whatever `dtype` says (mergekit computes in `dtype`); the output takes `out_dtype`,
else `dtype`, else the base's dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import ConfigError

# mergekit name -> (Mergeflow method, mergekit's normalize and rescale defaults)
GTA = {"task_arithmetic": ("task_arithmetic_weighted", False, False), "ties": ("ties_per_tensor", True, False),
       "dare_ties": ("dare_ties", False, True), "dare_linear": ("dare_linear", False, True),
       "breadcrumbs": ("breadcrumbs", False, False), "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
       "della": ("della", True, True), "della_linear": ("della_linear", False, True)}
OTHER = {"slerp": "slerp", "model_stock": "model_stock", "linear": "linear"}
PER_MODEL = {"weight", "density", "gamma", "epsilon"}  # mergekit's per-model parameters of the GTA family
SHARED = {"task_arithmetic": set(), "ties": set(), "dare_ties": set(), "dare_linear": set(),
          "breadcrumbs": {"gamma"}, "breadcrumbs_ties": {"gamma"}, "della": {"epsilon"}, "della_linear": {"epsilon"}}
DTYPES = ("float32", "float16", "bfloat16")
TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "modules", "tokenizer", "chat_template"}


@dataclass(frozen=True)
class MergekitMerge:
    """A mergekit config as a Mergeflow merge."""

    method: str
    params: dict[str, Any]
    base: str
    expert_uris: list[str]
    out_dtype: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}")


def _model_uri(value: Any, where: str, base: str | None = None) -> str:
    """A model reference as a URI Mergeflow reads: a local path or an fsspec URL (no hub ids)."""
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a model path, got {value!r}")
    if "+" in value and "://" not in value.split("+", 1)[0]:
        model, adapter = value.split("+", 1)
        if base is not None and model == base:
            return adapter  # a LoRA adapter over the base: merged as the adapter itself
        raise _fail(where, f"{value!r}: a LoRA adapter applied to a model other than the base is not supported "
                           "(give the adapter over the base, or merge the adapter into its model first)")
    if "://" in value or Path(value).exists():
        return value
    raise _fail(where, f"{value!r} is neither a local path nor a URL (Mergeflow reads no model hub: download it "
                       "first)")


def _layer_count(uri: str) -> int | None:
    config = Path(uri) / "config.json"
    if "://" in uri or not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("num_hidden_layers") or data.get("n_layer") or data.get("num_layers")


def _models_of_slices(slices: Any, where: str = "slices") -> list[dict[str, Any]]:
    """`slices` that take whole models, as a models list (each source's parameters kept)."""
    if not isinstance(slices, list) or len(slices) != 1:
        raise _fail(where, "only one slice over whole models is supported (layer stacking is not)")
    unsupported = set(slices[0]) - {"sources"}
    if unsupported:
        raise _fail(f"{where}[0].{sorted(unsupported)[0]}", "not supported")
    models = []
    for i, source in enumerate(slices[0].get("sources") or []):
        here = f"{where}[0].sources[{i}]"
        extra = set(source) - {"model", "layer_range", "parameters"}
        if extra:
            raise _fail(f"{here}.{sorted(extra)[0]}", "not supported")
        layers = _layer_count(str(source.get("model", "")))
        wanted = source.get("layer_range")
        if layers is None or list(wanted or []) != [0, layers]:
            raise _fail(f"{here}.layer_range", f"{wanted} does not take the whole model "
                                               f"({'unknown layer count' if layers is None else f'{layers} layers'}); "
                                               "only whole-model slices are supported")
        models.append({"model": source["model"], "parameters": source.get("parameters")})
    return models


def _setting(value: Any, where: str) -> Any:
    """A mergekit parameter value (number, gradient, filters) as Mergeflow's `Setting` reads it."""
    if isinstance(value, bool) or value is None:
        raise _fail(where, f"expected a number, a gradient or filters, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return list(value)
        if all(isinstance(v, dict) for v in value):
            for j, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if extra:
                    raise _fail(f"{where}[{j}].{sorted(extra)[0]}", "not a filter field (filter, value)")
                _setting(entry.get("value"), f"{where}[{j}].value")
            return [dict(entry) for entry in value]
    raise _fail(where, f"expected a number, a gradient or filters, got {value!r}")


def read_mergekit(path: str | Path, data: Mapping[str, Any] | None = None,
                  tasks: Sequence[str] | None = None) -> MergekitMerge:
    """The Mergeflow merge a mergekit YAML file describes (`data`: its parsed contents, when already read).

    With `tasks` (a run config's merge): each model names one of the run's tasks, every task once, the base is the
    run's model (`base_model: base` or none), and the experts and their parameters come in the tasks' order."""
    where = str(path)
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the mergekit config ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a mergekit config is a mapping (merge_method, base_model, models, ...)")
    for key in data:
        if key not in TOP_LEVEL:
            raise _fail(f"{where}: {key}", "not a mergekit field")
    for key in ("modules", "tokenizer", "chat_template"):
        if data.get(key) is not None:
            raise _fail(f"{where}: {key}", "not supported by Mergeflow")
    if data.get("tokenizer_source") not in (None, "base"):
        raise _fail(f"{where}: tokenizer_source", f"{data['tokenizer_source']!r} is not supported (only the base's "
                                                  "tokenizer, which every merge copies)")
    name = data.get("merge_method")
    if name not in GTA and name not in OTHER:
        raise _fail(f"{where}: merge_method", f"{name!r} is not supported; supported: "
                                              f"{', '.join(sorted([*GTA, *OTHER]))}")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise _fail(f"{where}: {key}", f"{data[key]!r} is not one of {', '.join(DTYPES)}")
    if data.get("models") and data.get("slices"):
        raise _fail(f"{where}: slices", "give models or slices, not both")
    if tasks is not None and data.get("slices"):
        raise _fail(f"{where}: slices", "a run config's mergekit file lists its tasks under models")
    models = data.get("models") or (_models_of_slices(data["slices"], f"{where}: slices") if data.get("slices")
                                    else None)
    if not models:
        raise _fail(f"{where}: models", "no models to merge")
    if tasks is not None:
        return _for_tasks(name, data, models, list(tasks), where)
    base_ref = data.get("base_model")
    if not base_ref and name != "linear":
        raise _fail(f"{where}: base_model", "Mergeflow merges task vectors over a base model: give base_model")
    if not base_ref:  # linear without a base: the first model is read as the base, its weight as base_weight
        base_ref = str(models[0].get("model", "")) if isinstance(models[0], Mapping) else ""
    base_ref = str(base_ref)
    base = _model_uri(base_ref, f"{where}: base_model")
    experts, own, base_own = [], [], None
    for i, entry in enumerate(models):
        here = f"{where}: models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(here, "expected {model: ..., parameters: {...}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise _fail(f"{here}.{sorted(extra)[0]}", "not a mergekit model field")
        if str(entry["model"]) == base_ref:
            base_own = (here, dict(entry.get("parameters") or {}))  # only linear weighs the base as an input
            continue
        experts.append(_model_uri(str(entry["model"]), f"{here}.model", base_ref))
        own.append((here, dict(entry.get("parameters") or {})))
    if not experts:
        raise _fail(f"{where}: models", "no model besides the base to merge")
    if name == "linear":
        params = _linear(dict(data.get("parameters") or {}), own, base_own, where)
        return MergekitMerge("linear", params, base, experts, data.get("out_dtype") or data.get("dtype"), where)
    params = _parameters(name, dict(data.get("parameters") or {}), own, where)
    return MergekitMerge(GTA[name][0] if name in GTA else OTHER[name], params, base, experts,
                         data.get("out_dtype") or data.get("dtype"), where)


def _parameters(name: str, shared: dict[str, Any], own: list[tuple[str, dict[str, Any]]], where: str
                ) -> dict[str, Any]:
    """Mergeflow's parameters of mergekit method `name` from its global and per-model parameters."""
    if name == "slerp":
        _only(shared, {"t"}, f"{where}: parameters")
        for here, values in own:
            _only(values, set(), f"{here}.parameters")
        if "t" not in shared:
            raise _fail(f"{where}: parameters.t", "slerp needs t (mergekit has no default)")
        return {"t": _setting(shared["t"], f"{where}: parameters.t")}
    if name == "model_stock":
        _only(shared, {"filter_wise"}, f"{where}: parameters")
        for here, values in own:
            _only(values, set(), f"{here}.parameters")
        return {"filter_wise": bool(shared.get("filter_wise", False))}
    _, normalize, rescale = GTA[name]
    allowed = {"weight"} | ({"density"} if name != "task_arithmetic" else set()) | SHARED[name]
    _only(shared, allowed | {"lambda", "normalize", "rescale", "int8_mask"}, f"{where}: parameters")
    if name == "task_arithmetic" and "rescale" in shared:
        raise _fail(f"{where}: parameters.rescale", "task_arithmetic sparsifies nothing: rescale means nothing")
    lam = shared.get("lambda", 1.0)
    if not isinstance(lam, (int, float)) or isinstance(lam, bool):
        raise _fail(f"{where}: parameters.lambda", f"{lam!r}: only a number (gradients and filters of lambda are "
                                                   "not supported)")
    params: dict[str, Any] = {"scaling": lam, "normalize": bool(shared.get("normalize", normalize))}
    if name != "task_arithmetic":
        params["rescale"] = bool(shared.get("rescale", rescale))
        params["density"] = 1.0  # mergekit's default
    for key in allowed:
        if key in shared:
            params[key] = _setting(shared[key], f"{where}: parameters.{key}")
    per_expert = []
    for here, values in own:
        _only(values, allowed, f"{here}.parameters")
        if "weight" not in values and "weight" not in shared:
            raise _fail(f"{here}.parameters.weight", f"mergekit's {name} needs a weight for every model")
        per_expert.append({key: _setting(value, f"{here}.parameters.{key}") for key, value in values.items()})
    if any(per_expert):
        params["per_expert"] = per_expert
    return params


def _for_tasks(name: str, data: Mapping[str, Any], models: list[Any], tasks: list[str], where: str
               ) -> MergekitMerge:
    """A mergekit config whose models name a run's tasks, as that run's merge (experts in the tasks' order)."""
    if data.get("out_dtype") is not None:
        raise _fail(f"{where}: out_dtype", "a run's merges keep the base's dtype")
    if data.get("base_model") not in (None, "base"):
        raise _fail(f"{where}: base_model", f"{data['base_model']!r}: in a run config the base is the run's model "
                                            "(write base_model: base, or leave it out)")
    own: dict[str, tuple[str, dict[str, Any]]] = {}
    base_own = None
    for i, entry in enumerate(models):
        here = f"{where}: models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise _fail(here, "expected {model: TASK, parameters: {...}}")
        task = str(entry["model"])
        if task == "base":
            base_own = (here, dict(entry.get("parameters") or {}))
            continue
        if task not in tasks:
            raise _fail(f"{here}.model", f"{task!r} is not a task of this run (tasks: {', '.join(tasks)})")
        if task in own:
            raise _fail(f"{here}.model", f"task {task!r} is listed twice")
        own[task] = (here, dict(entry.get("parameters") or {}))
    if missing := [t for t in tasks if t not in own]:
        raise _fail(f"{where}: models", f"every task of the run is merged: add {', '.join(missing)}")
    ordered = [own[t] for t in tasks]
    shared = dict(data.get("parameters") or {})
    params = _linear(shared, ordered, base_own, where) if name == "linear" else _parameters(name, shared, ordered, where)
    return MergekitMerge(GTA[name][0] if name in GTA else OTHER[name], params, "base", list(tasks),
                         data.get("out_dtype") or data.get("dtype"), where)


def _linear(shared: dict[str, Any], own: list[tuple[str, dict[str, Any]]],
            base_own: tuple[str, dict[str, Any]] | None, where: str) -> dict[str, Any]:
    """Mergeflow's `linear` parameters: the experts' weights, the base's own weight where it is one of the models."""
    _only(shared, {"weight", "normalize"}, f"{where}: parameters")
    params: dict[str, Any] = {"normalize": bool(shared.get("normalize", True))}
    if "weight" in shared:
        params["weight"] = _setting(shared["weight"], f"{where}: parameters.weight")
    for here, values in own + ([base_own] if base_own else []):
        _only(values, {"weight"}, f"{here}.parameters")
        if "weight" not in values and "weight" not in shared:
            raise _fail(f"{here}.parameters.weight", "mergekit's linear needs a weight for every model")
    params["per_expert"] = [{"weight": _setting(v["weight"], f"{h}.parameters.weight")} if "weight" in v else {}
                            for h, v in own]
    if base_own is not None:
        here, values = base_own
        params["base_weight"] = _setting(values.get("weight", shared.get("weight")), f"{here}.parameters.weight")
    return params


def _only(values: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in values:
        if key not in allowed:
            raise _fail(f"{where}.{key}", f"not supported here (supported: {', '.join(sorted(allowed)) or 'none'})")


# Mergeflow -> mergekit: methods whose arithmetic mergekit shares (up to fp32 rounding)
def to_mergekit(method: str, params: Mapping[str, Any], base: str, experts: list[str],
                out_dtype: str | None = None) -> str | None:
    """The mergekit YAML of a Mergeflow merge, or None where mergekit computes something else (e.g. Mergeflow's
    `ties` trims by a model-wide top-k, its `dare` rescales by 1/(1-p), and mergekit has no TSV-M or RegMean)."""
    reverse = {mine: theirs for theirs, (mine, _, _) in GTA.items()} | {v: k for k, v in OTHER.items()}
    config: dict[str, Any]
    if method == "task_arithmetic":
        config = {"merge_method": "task_arithmetic", "base_model": base,
                  "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
                  "parameters": {"lambda": params.get("scaling", 0.3), "normalize": False}}
    elif method == "average":
        config = {"merge_method": "task_arithmetic", "base_model": base,
                  "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
                  "parameters": {"lambda": 1.0 / len(experts), "normalize": False}}
    elif method in ("slerp", "model_stock"):
        config = {"merge_method": method, "base_model": base,
                  "models": [{"model": base}] + [{"model": e} for e in experts],
                  "parameters": {"t": _plain(params.get("t", 0.5))} if method == "slerp" else
                  {"filter_wise": bool(params.get("filter_wise", False))}}
    elif method == "linear":
        own = list(params.get("per_expert") or [])
        mine = [(own[i] if i < len(own) else {}).get("weight") for i in range(len(experts))]
        weights = [_plain(params.get("weight", 1.0) if w is None else w) for w in mine]
        models = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]
        if params.get("base_weight", 0.0) != 0.0:
            models.insert(0, {"model": base, "parameters": {"weight": _plain(params["base_weight"])}})
        config = {"merge_method": "linear", "base_model": base, "models": models,
                  "parameters": {"normalize": bool(params.get("normalize", True))}}
    elif method in reverse:
        name = reverse[method]
        shared = {"lambda": params.get("scaling", 1.0), "normalize": bool(params.get("normalize", False))}
        if "rescale" in params:
            shared["rescale"] = bool(params["rescale"])
        for key in ("weight", "density", "gamma", "epsilon"):
            if key in params:
                shared[key] = _plain(params[key])
        if params.get("seed", 0):
            return None  # mergekit's random masks take --random-seed, not a parameter
        per_expert = list(params.get("per_expert") or [])
        models = []
        for i, e in enumerate(experts):
            own = {k: _plain(v) for k, v in (per_expert[i] if i < len(per_expert) else {}).items() if v is not None}
            models.append({"model": e, "parameters": own} if own else {"model": e})
        config = {"merge_method": name, "base_model": base, "models": models, "parameters": shared}
    else:
        return None
    if out_dtype:
        config["out_dtype"] = out_dtype
    config["dtype"] = "float32"
    return yaml.safe_dump(config, sort_keys=False)


def _plain(value: Any) -> Any:
    """A setting as plain YAML data (tuples to lists, filter models to dicts)."""
    if hasattr(value, "model_dump"):
        return {k: _plain(v) for k, v in value.model_dump(exclude_none=True).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def expand_run_merges(data: Any) -> Any:
    """A run config's raw data with each `merges` entry that names a `mergekit` file given that file's method and
    parameters (for the run's tasks, in their order). An entry that already carries a method or params (a config
    dumped after validation) must agree with the file. Errors are ValueErrors naming `merges.<i>.mergekit`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("merges"), list):
        return data
    from mergeflow.methods import build_method

    tasks = [t.get("name") if isinstance(t, Mapping) else getattr(t, "name", None) for t in data.get("tasks") or []]
    merges = []
    for i, entry in enumerate(data["merges"]):
        if not isinstance(entry, Mapping) or not entry.get("mergekit"):
            merges.append(entry)
            continue
        where = f"merges.{i}.mergekit"
        try:
            merge = read_mergekit(str(entry["mergekit"]), tasks=[str(t) for t in tasks])
            method = build_method(merge.method, merge.params)
            method.check_expert_count(len(tasks))
            if entry.get("method") not in (None, merge.method) or (
                    "params" in entry and build_method(merge.method, entry["params"]).params != method.params):
                raise ConfigError(f"the file gives method {merge.method!r} with its parameters: drop method and "
                                  "params from this entry")
        except ConfigError as exc:
            raise ValueError(f"{where}: {exc}") from None
        merges.append({**entry, "method": merge.method, "params": merge.params})
    return {**data, "merges": merges}

