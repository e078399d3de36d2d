"""How the model's own card calls it: the workload to plan for where the user gives none.

A pipeline class's defaults are not always the model's: ZImagePipeline defaults to
``guidance_scale=5.0`` (classifier-free guidance, two denoiser passes per step) and 50 steps, while
Z-Image-Turbo, distilled, is run with ``guidance_scale=0.0`` and 9 steps. Planning with the class's
defaults doubles the denoiser's work and its batch. The model card (``README.md`` beside
``model_index.json``: the hub's metadata download fetches it, a cloned repository holds it) shows how
the model is called; its Python code blocks are read as a user's script is (tools/script.py), and
the pipeline call's ``guidance_scale`` and ``num_inference_steps`` become the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

CARD = "README.md"
# what a card's example decides: how the denoiser runs (sizes stay the user's, or recommend's defaults)
CARD_FIELDS = ("guidance_scale", "steps")
_CODE_BLOCK = re.compile(r"^```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_MAX_CARD_BYTES = 512 * 1024  # a card is a few KiB; a larger README is not worth parsing for two numbers


def card_call(root: Path | None) -> dict[str, int | float]:
    """The ``guidance_scale`` and ``steps`` (recommend's names) the first example in the model card at
    ``root`` passes to its pipeline call; empty where there is no card, no Python example building a
    pipeline, or the example leaves both to the pipeline."""
    card = root / CARD if root is not None else None
    if card is None or not card.is_file() or card.stat().st_size > _MAX_CARD_BYTES:
        return {}
    from .errors import PipefitError
    from .script import analyze, call_workload, parse  # libcst: only when a card is there

    for block in _CODE_BLOCK.findall(card.read_text(errors="replace")):
        try:
            workload = call_workload(analyze(parse(block, CARD), CARD))
        except PipefitError:  # not Python, or no pipeline built in this block
            continue
        found = {name: workload[name] for name in CARD_FIELDS if name in workload}
        if found:
            return found
    return {}
