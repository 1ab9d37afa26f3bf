"""The trainer's checkpoint/resume, gradient accumulation, schedules and precision, on a tiny random BERT and real
tweets: a run killed (SIGKILL) or failing mid-way and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from mergeflow.families.text.encoder import TextEncoder, minilm_path
from mergeflow.families.text.data import SplitSizes, TextSplit, load_text_task
from mergeflow.families.text.training import finetune_encoder
from mergeflow.finetune import CHECKPOINT_NAME, FinetuneResult, FinetuneSettings
from mergeflow.heads import ClassificationHead

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 30522, "max_position_embeddings": 64}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Dropout stays on (BERT's default 0.1): resuming must restore the RNG to match the uninterrupted run.
BASE = FinetuneSettings(steps=8, batch_size=4, lr=1e-3, weight_decay=0.1, warmup_steps=2, max_length=24, seed=3,
                        checkpoint_every=2)
KILLED = replace(BASE, steps=6, grad_accumulation=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> TextSplit:
    sizes = SplitSizes(probe_per_class=1, train=64, validation=0, test=1)
    return load_text_task("election", cache_dir=tmp_path_factory.getbasetemp() / "wheels", sizes=sizes).splits["train"]


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    """The tiny encoder's starting weights (dropout does not change the parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TextEncoder(BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False)).state_dict()


@pytest.fixture(scope="module")
def head() -> ClassificationHead:
    generator = torch.Generator().manual_seed(1)
    return ClassificationHead(torch.randn(2, 32, generator=generator), torch.randn(2, generator=generator), 4.0)


def encoder_from(initial: dict[str, torch.Tensor], dropout: bool = True) -> TextEncoder:
    encoder = TextEncoder(BertModel(BertConfig(**TINY_BERT, **({} if dropout else NO_DROPOUT)),
                                    add_pooling_layer=False))
    encoder.load_state_dict(initial)
    return encoder


@pytest.fixture(scope="module")
def run(initial, tokenizer, head, train) -> Callable[..., FinetuneResult]:
    """Fine-tune a fresh tiny encoder (the same starting weights every time) on the tweets."""

    def run(settings: FinetuneSettings, *, dropout: bool = True, tokenizer_: Any = None, split: TextSplit | None = None,
            **kwargs: Any) -> FinetuneResult:
        return finetune_encoder(encoder_from(initial, dropout), tokenizer_ or tokenizer, head, split or train,
                                settings, progress=kwargs.pop("progress", False), **kwargs)

    return run


@pytest.fixture(scope="module")
def reference(run) -> FinetuneResult:
    """BASE uninterrupted, without checkpoints."""
    return run(BASE)


def assert_identical(got: FinetuneResult, want: FinetuneResult) -> None:
    assert got.losses == want.losses
    assert got.learning_rates == want.learning_rates
    assert got.state_dict.keys() == want.state_dict.keys()
    for key, tensor in want.state_dict.items():
        assert torch.equal(got.state_dict[key], tensor), key


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


class FailingTokenizer:
    """Tokenizes as `inner` until call number `fail_at` (0-based), which raises: a crash in the middle of a step."""

    def __init__(self, inner: PreTrainedTokenizerBase, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.inner(*args, **kwargs)


CHILD = r'''
"""Fine-tune as the parent test describes, then hang mid-step at tokenizer call `stall_at` until killed."""
import json, sys, time
from pathlib import Path
import mergeflow  # first: it makes transformers importable beside this environment's torchvision (mergeflow.compat)
import torch
from transformers import AutoTokenizer, BertConfig, BertModel
from mergeflow.families.text.encoder import TextEncoder
from mergeflow.families.text.data import TextSplit
from mergeflow.families.text.training import finetune_encoder
from mergeflow.finetune import FinetuneSettings
from mergeflow.heads import ClassificationHead

work = Path(sys.argv[1])
job = json.loads((work / "job.json").read_text())
torch.set_num_threads(job["threads"])
encoder = TextEncoder(BertModel(BertConfig(**job["config"]), add_pooling_layer=False))
encoder.load_state_dict(torch.load(work / "initial.pt", weights_only=True))
inner = AutoTokenizer.from_pretrained(job["model_dir"])
calls = 0

def tokenizer(*args, **kwargs):
    global calls
    if calls == job["stall_at"]:
        (work / "stalled").write_text("")
        time.sleep(3600)
    calls += 1
    return inner(*args, **kwargs)

finetune_encoder(encoder, tokenizer, ClassificationHead.load(work / "head.safetensors"),
                 TextSplit(job["texts"], job["labels"]), FinetuneSettings(**job["settings"]), progress=False,
                 checkpoint_dir=job["checkpoint_dir"])
(work / "finished").write_text("")
'''


def test_killed_process_resumes_bit_identical(tmp_path: Path, run, initial, head, train, model_dir: Path) -> None:
    """A child process trains with checkpoints every 3 steps and is SIGKILLed half-way through step 4 (one of its
    two micro-batches done); resuming in this process ends exactly where an uninterrupted run ends."""
    checkpoint_dir = tmp_path / "run-key"
    stall_at = KILLED.checkpoint_every * KILLED.grad_accumulation + 1
    job = {"config": TINY_BERT, "settings": dataclasses.asdict(KILLED), "texts": train.texts, "labels": train.labels,
           "model_dir": str(model_dir), "checkpoint_dir": str(checkpoint_dir), "stall_at": stall_at,
           "threads": torch.get_num_threads()}
    (tmp_path / "job.json").write_text(json.dumps(job))
    torch.save(initial, tmp_path / "initial.pt")
    head.save(tmp_path / "head.safetensors")
    (tmp_path / "child.py").write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint_dir / CHECKPOINT_NAME).exists() or not (tmp_path / "stalled").exists():
            if child.poll() is not None:
                pytest.fail(f"the child exited early ({child.returncode}): {child.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint from the child within 120 s")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (tmp_path / "finished").exists()
    assert load(checkpoint_dir / CHECKPOINT_NAME)["step"] == KILLED.checkpoint_every

    resumed = run(KILLED, checkpoint_dir=str(checkpoint_dir))
    assert resumed.resumed_from == KILLED.checkpoint_every
    uninterrupted = run(KILLED)
    assert uninterrupted.resumed_from == 0 and len(uninterrupted.losses) == KILLED.steps
    assert_identical(resumed, uninterrupted)
    assert load(checkpoint_dir / CHECKPOINT_NAME)["step"] == KILLED.steps


def test_resume_through_fsspec_memory_filesystem(run, tokenizer, reference, capsys) -> None:
    """Checkpoints on a non-local fsspec store (memory://): a run failing in step 6 resumes from step 4."""
    checkpoint_dir = f"memory://mergeflow-test/{uuid.uuid4().hex}/run-key"
    fs = fsspec.filesystem("memory")
    root = checkpoint_dir[len("memory://"):]
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(BASE, tokenizer_=FailingTokenizer(tokenizer, fail_at=5), checkpoint_dir=checkpoint_dir)
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == [CHECKPOINT_NAME]
        with fs.open(f"{root}/{CHECKPOINT_NAME}", "rb") as file:
            assert torch.load(io.BytesIO(file.read()), weights_only=True)["step"] == 4
        capsys.readouterr()
        resumed = run(BASE, checkpoint_dir=checkpoint_dir, progress=True)
        assert resumed.resumed_from == 4
        assert_identical(resumed, reference)
        bar = capsys.readouterr().err
        assert "4/8" in bar and "8/8" in bar and "0/8" not in bar  # the progress bar starts at the resumed step
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_settings_or_data_mismatch_is_refused(tmp_path: Path, run, train, reference) -> None:
    checkpoint_dir = str(tmp_path / "run-key")
    assert run(BASE, checkpoint_dir=checkpoint_dir).resumed_from == 0
    with pytest.raises(ValueError, match=r"lr=0\.001 in the checkpoint, 0\.002 now") as error:
        run(replace(BASE, lr=2e-3), checkpoint_dir=checkpoint_dir)
    assert "steps" not in str(error.value) and "seed" not in str(error.value)
    with pytest.raises(ValueError, match="grad_accumulation=1 in the checkpoint, 2 now"):
        run(replace(BASE, grad_accumulation=2), checkpoint_dir=checkpoint_dir)
    with pytest.raises(ValueError, match=r"schedule='cosine' in the checkpoint, 'constant' now"):
        run(replace(BASE, schedule="constant"), checkpoint_dir=checkpoint_dir)
    other = TextSplit(train.texts[:-1] + ["another text"], train.labels)
    with pytest.raises(ValueError, match="data: the training split differs"):
        run(BASE, checkpoint_dir=checkpoint_dir, split=other)
    # How often checkpoints are written does not change the weights: a finished run is picked up as it is.
    done = run(replace(BASE, checkpoint_every=3), checkpoint_dir=checkpoint_dir)
    assert done.resumed_from == BASE.steps
    assert_identical(done, reference)


def test_grad_accumulation_matches_one_large_batch(tmp_path: Path, run) -> None:
    """k micro-batches of b texts step like one batch of k*b texts (dropout off, no clipping): same losses, the
    same AdamW moments (which scale with the gradient, so a mis-scaled loss shows) and the same weights."""
    runs = {}
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        settings = FinetuneSettings(steps=3, batch_size=batch_size, grad_accumulation=accumulation, lr=1e-3,
                                    warmup_steps=1, max_length=24, seed=5, grad_clip=math.inf, checkpoint_every=3)
        checkpoint_dir = tmp_path / f"b{batch_size}"
        result = run(settings, dropout=False, checkpoint_dir=str(checkpoint_dir))
        runs[accumulation] = result, load(checkpoint_dir / CHECKPOINT_NAME)["optimizer"]["state"]
    whole, whole_moments = runs[1]
    for accumulation in (2, 4):
        result, moments = runs[accumulation]
        assert result.losses == pytest.approx(whole.losses, rel=1e-6, abs=0)
        assert whole_moments.keys() == moments.keys() and len(moments) > 0
        for name in ("exp_avg", "exp_avg_sq"):
            # Parameters with no true gradient (e.g. attention key biases) hold rounding noise: measure every
            # difference against the largest moment of any parameter.
            scale = float(max(state[name].abs().max() for state in whole_moments.values()))
            for index, state in whole_moments.items():
                torch.testing.assert_close(moments[index][name], state[name], rtol=1e-4, atol=1e-5 * scale)
        for key, tensor in whole.state_dict.items():  # Adam turns that noise into tiny steps of up to ~lr
            torch.testing.assert_close(result.state_dict[key], tensor, rtol=0, atol=5e-5)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_learning_rates(run, schedule: str) -> None:
    settings = FinetuneSettings(steps=7, batch_size=2, lr=2e-3, warmup_steps=3, max_length=16, schedule=schedule)
    result = run(settings)

    def expected(step: int) -> float:
        if step < 3:
            return 2e-3 * (step + 1) / 3
        return 2e-3 if schedule == "constant" else 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 4))

    assert result.learning_rates == pytest.approx([expected(step) for step in range(7)], rel=1e-12, abs=0)
    assert len(result.losses) == 7


def test_checkpoint_loads_weights_only_and_survives_a_torn_write(tmp_path: Path, run, reference,
                                                                 monkeypatch) -> None:
    """The payload is plain (weights_only=True); a write that dies half-way leaves the previous checkpoint."""
    complete = tmp_path / "complete"
    result = run(BASE, checkpoint_dir=str(complete))
    payload = load(complete / CHECKPOINT_NAME)
    assert payload["step"] == 8 and payload["losses"] == result.losses
    assert payload["settings"] == dataclasses.asdict(BASE)
    assert payload["learning_rates"] == result.learning_rates
    assert payload["rng"]["cpu"].dtype == torch.uint8
    assert {key.removeprefix("backbone.") for key in payload["encoder"]} >= set(result.state_dict) - {
        "embeddings.position_ids"}
    assert payload["scheduler"]["last_epoch"] == 8 and len(payload["optimizer"]["state"]) > 0

    real_save, calls = torch.save, []

    def torn_save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        """The second checkpoint write stops half-way (disk full, killed)."""
        calls.append(target)
        if len(calls) < 2:
            return real_save(obj, target, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        if hasattr(target, "write"):
            target.write(data[: len(data) // 2])
        else:
            Path(target).write_bytes(data[: len(data) // 2])
        raise OSError("no space left on device")

    torn = tmp_path / "torn"
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="no space left"):
        run(BASE, checkpoint_dir=str(torn))
    monkeypatch.undo()
    assert len(calls) == 2
    assert load(torn / CHECKPOINT_NAME)["step"] == 2
    assert sorted(p.name for p in torn.iterdir()) == [CHECKPOINT_NAME]  # the torn temporary file is gone
    (torn / f".{CHECKPOINT_NAME}.partial-stale").write_bytes(b"half a checkpoint")  # a leftover is never read
    resumed = run(BASE, checkpoint_dir=str(torn))
    assert resumed.resumed_from == 2
    assert_identical(resumed, reference)


def test_bf16_autocast_on_cpu_and_invalid_settings(run, reference) -> None:
    """Explicit bf16 autocasts (losses differ from fp32) while the weights stay fp32; "auto" is fp32 on the CPU."""
    short = replace(BASE, steps=2, checkpoint_every=0)
    fp32, auto, bf16 = run(replace(short, precision="fp32")), run(short), run(replace(short, precision="bf16"))
    assert fp32.losses == auto.losses == reference.losses[:2]
    assert bf16.losses != fp32.losses and all(math.isfinite(loss) for loss in bf16.losses)
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)
    assert all(tensor.dtype == fp32.state_dict[key].dtype for key, tensor in bf16.state_dict.items())
    for bad in ({"schedule": "linear"}, {"precision": "fp16"}, {"grad_accumulation": 0}, {"checkpoint_every": -1}):
        with pytest.raises(ValueError):
            replace(BASE, **bad)
