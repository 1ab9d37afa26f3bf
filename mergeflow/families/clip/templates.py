"""Prompt templates for CLIP zero-shot heads on the eight vision tasks of the task-vectors benchmark.

Each template holds one `{}` that takes a class name. The lists follow the prompts the CLIP paper published per
dataset and the task-arithmetic / AdaMerging line of work reuses (written out here, not copied from a file). The
sklearn `digits` task reads like MNIST and uses its template.
"""

from __future__ import annotations

from mergeflow.errors import ConfigError

_CARS = ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
         "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.")

_DTD = tuple(f"a photo of {article} {{}} {noun}." for article in ("a", "the")
             for noun in ("texture", "pattern", "thing", "object"))

_EUROSAT = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.")

_GTSRB = ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
          'a close up photo of a "{}" traffic sign.')

_NUMBER = ('a photo of the number: "{}".',)

_RESISC45 = tuple(f"{source} {view} of {article}{{}}." for article in ("", "a ", "the ")
                  for view in ("imagery", "photo", "view") for source in ("satellite", "aerial"))

_SUN397 = ("a photo of a {}.", "a photo of the {}.")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "sun397": _SUN397,
    "stanford_cars": _CARS,
    "resisc45": _RESISC45,
    "eurosat": _EUROSAT,
    "svhn": _NUMBER,
    "gtsrb": _GTSRB,
    "mnist": _NUMBER,
    "dtd": _DTD,
}

ALIASES = {"cars": "stanford_cars", "stanfordcars": "stanford_cars", "digits": "mnist"}


def templates_for(task: str) -> tuple[str, ...]:
    """The templates of `task` (case-insensitive; `cars` and `digits` are aliases); ConfigError names the known ones."""
    key = task.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in TEMPLATES:
        raise ConfigError(f"no CLIP prompt templates for task {task!r}; known: {', '.join(sorted(TEMPLATES))} "
                          f"(aliases: {', '.join(sorted(ALIASES))})")
    return TEMPLATES[key]
