"""Model families behind one interface (`Family`): what the pipeline's stages need from a model architecture."""

from __future__ import annotations

from mergeflow.errors import ConfigError
from mergeflow.families.base import Family, LoadedModel, TaskData
from mergeflow.families.causal_lm.family import CausalLMFamily
from mergeflow.families.clip.family import HFClipFamily, OpenClipFamily
from mergeflow.families.seq2seq.family import Seq2SeqFamily
from mergeflow.families.text.family import TextFamily

FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (TextFamily, OpenClipFamily, HFClipFamily,
                                                               Seq2SeqFamily, CausalLMFamily)}


def get_family(name: str) -> Family:
    """The family called `name`; ConfigError listing the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]()


__all__ = ["FAMILIES", "Family", "LoadedModel", "TaskData", "get_family"]
