"""The fine-tune stage's settings (`RunConfig.finetune`, re-exported by `mergeflow.config`): the trainer's recipe
(`mergeflow.finetune.FinetuneSettings` takes the same fields) and, for the families that have it, LoRA."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

LORA_FAMILIES = ("causal_lm",)  # families whose fine-tune stage trains a LoRA adapter (`Family.finetune_adapter`)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")  # as mergeflow.config.StrictModel


class LoraConfig(_Strict):
    """LoRA fine-tuning (peft): the expert is a PEFT adapter directory, W = W0 + alpha / r * B @ A per target."""

    r: int = Field(8, ge=1, le=4096, description="rank of each adapter")
    alpha: int = Field(16, ge=1, description="lora_alpha: the update B @ A is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input while training")
    target_modules: list[str] | None = Field(None, min_length=1, description="names (or name suffixes) of the "
                                             "linear layers to adapt, e.g. [q_proj, v_proj]; empty: peft's default "
                                             "for the architecture (Llama, Mistral, Qwen2: q_proj, v_proj; GPT-2: "
                                             "c_attn)")


class FinetuneConfig(_Strict):
    steps: int = Field(100, ge=1, description="optimizer steps per expert")
    batch_size: int = Field(16, ge=1, description="examples per step")
    lr: float = Field(5e-5, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps before cosine decay")
    max_length: int = Field(64, ge=8, description="tokens per text")
    seed: int = Field(0, description="seed of batch order and initialisation")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine decay to 0 or "
                                                    "a constant learning rate")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step (effective batch = "
                                   "batch_size x grad_accumulation)")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints in the store (a "
                                  "retried or restarted task resumes from the last one); 0: none")
    lora: LoraConfig | None = Field(None, description="causal_lm: train a LoRA adapter (the stored expert is the "
                                    "PEFT adapter directory, a few MB); empty: fine-tune every parameter")

    @model_serializer(mode="wrap")
    def _lora_only_when_set(self, handler: Any) -> Any:
        """Without LoRA the settings dump as before the field existed, so the experts' fingerprints (their store
        locations), their metadata and the run digests of existing configs stay what they were."""
        data = handler(self)
        if self.lora is None and isinstance(data, dict):
            data.pop("lora", None)
        return data

    def trainer_settings(self) -> dict[str, Any]:
        """The fields `mergeflow.finetune.FinetuneSettings` takes (all but `lora`)."""
        return self.model_dump(exclude={"lora"})
