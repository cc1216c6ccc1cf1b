"""Judge prompts (DESIGN §3) and the JSON schemas for structured output.

The prompts carry the content of the SRUM paper's judge prompts (Tables 7 and 8), written in our
own words:

* :func:`global_layout_prompt` -- one score in [-1, 1] for how well the arrangement of the scene
  follows the prompt's spatial intent, with a neutral band for prompts that ask for no layout.
* :func:`region_prompt` -- the "hybrid" prompt: regions listed by id and pixel box; per region the
  judge names the object, then gives one strict score covering relevance *and* visual quality.
* :func:`sample_level_prompt` -- one overall score for the whole image (the paper's sample-level
  ablation).
* :func:`grounding_prompt` -- asks the understanding module for the prompt's objects as pixel boxes
  (Qwen2.5-VL style JSON), used when regions come from the judge instead of segment-anything.

Every judge prompt has a ``structured`` variant that asks for JSON matching
:func:`global_json_schema` / :func:`regions_json_schema`; there the score is an integer number of
tenths (-10..10), which keeps the schema bounded and easy for grammar-guided decoding.

The user's prompt is embedded as a JSON string literal (quotes, backslashes and newlines escaped),
so a prompt can neither break the template (braces are never re-formatted) nor inject extra
answer lines such as ``Score: 1.0``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "GLOBAL_LAYOUT_TEMPLATE",
    "GROUNDING_MAX_OBJECTS",
    "GROUNDING_TEMPLATE",
    "LABEL_MAX_CHARS",
    "OBJECT_MAX_CHARS",
    "PROMPT_LINE_PREFIX",
    "REASON_MAX_CHARS",
    "REGION_TEMPLATE",
    "SAMPLE_LEVEL_TEMPLATE",
    "SCORE_TENTHS",
    "global_json_schema",
    "global_layout_prompt",
    "grounding_json_schema",
    "grounding_prompt",
    "region_prompt",
    "regions_json_schema",
    "sample_level_prompt",
]

SCORE_TENTHS = list(range(-10, 11))
"""Structured mode: the score is an integer in tenths, -10..10 (7 means 0.7)."""
REASON_MAX_CHARS = 200
OBJECT_MAX_CHARS = 80
LABEL_MAX_CHARS = 80
GROUNDING_MAX_OBJECTS = 16

PROMPT_LINE_PREFIX = "Prompt the image was generated from: "
"""The line that carries the user's prompt, as a JSON string literal, in every template."""

# ---------------------------------------------------------------------------------------------
# Templates. Fields: {prompt_line}, {answer_format} (and {regions} for the region prompt). The
# answer-format blocks are inserted as values, so their JSON braces are not format fields.
# ---------------------------------------------------------------------------------------------

GLOBAL_LAYOUT_TEMPLATE = """\
# Job: rate the layout of a generated image
You are reviewing an image that was generated from a text prompt. Rate only how well its
composition follows the spatial intent of the prompt: where the elements sit, how they relate
to each other in space (left/right, above/below, in front/behind, inside, near/far), their
relative sizes, and the overall structure of the scene. Do not rate rendering quality here.

{prompt_line}

## Scoring guide (one number from -1.0 to 1.0)
- 1.0: the arrangement is exactly what the prompt describes.
- 0.5 to 0.9: the arrangement is largely right, with small layout mistakes.
- -0.4 to 0.4: neutral. Use this band when the prompt asks for no particular arrangement
  (for example "a photo of a tree") or the layout is ordinary; a plausible layout that
  nobody asked for must not be punished.
- -0.9 to -0.5: the arrangement is wrong or conflicts with the prompt.
- -1.0: the arrangement is the reverse of what the prompt asks for.

{answer_format}
Look at the image and answer now."""

REGION_TEMPLATE = """\
# Job: identify and rate regions of a generated image
You are reviewing an image that was generated from a text prompt. Boxes mark some regions of
the image; they carry no labels. Analyse every region below in two steps.

{prompt_line}

## Regions
Boxes are in pixels of the image, origin at the top-left corner, as [x1, y1, x2, y2]
(left, top, right, bottom).
{regions}

## Step 1: identify
Name the main object inside the box.

## Step 2: score
Give one score from -1.0 to 1.0 that covers both how relevant the object is to the prompt and
how well it is rendered. Be strict: give 1.0 only when the quality is beyond doubt.
- 1.0: exactly what the prompt asks for, rendered without any flaw.
- 0.5 to 0.9: very good; a relevant object with small flaws, or a well-made secondary element.
- -0.4 to 0.4: neutral or acceptable; a partly relevant object, mixed quality, or a harmless
  background element the prompt does not mention. 0.0 is exactly neutral.
- -0.9 to -0.5: bad; irrelevant and distracting, or a relevant object with severe distortions
  or artifacts (warped anatomy, melted shapes, garbled text).
- -1.0: very bad; the region works against the image and contradicts what the prompt intends.

{answer_format}
Look at the image and answer now."""

SAMPLE_LEVEL_TEMPLATE = """\
# Job: rate a generated image as a whole
You are reviewing an image that was generated from a text prompt. Give one overall score that
weighs together how faithfully the image shows what the prompt asks for (objects, counts,
attributes, colours, text, spatial relations), its visual quality (sharpness, anatomy,
artifacts, distortions) and its composition.

{prompt_line}

## Scoring guide (one number from -1.0 to 1.0)
- 1.0: faithful to the prompt in every respect, flawlessly rendered and well composed.
- 0.5 to 0.9: mostly faithful and good-looking, with small mistakes or flaws.
- -0.4 to 0.4: mixed; some parts right and some wrong, or visible but not severe flaws.
- -0.9 to -0.5: misses important parts of the prompt, or has severe artifacts.
- -1.0: unrelated to the prompt, or badly broken.

{answer_format}
Look at the image and answer now."""

SCORE_ANSWER_TEXT = """\
## Answer format
Reply with exactly these two lines:
Score: <number between -1.0 and 1.0>
Reason: <one or two sentences that justify the score>

Two examples written for other prompts:
Score: 0.9
Reason: The lamp stands on the desk left of the monitor, as asked; the desk edge is cropped.

Score: -0.6
Reason: The prompt puts the bicycle in front of the bench, but it stands behind the bench.
"""

SCORE_ANSWER_JSON = """\
## Answer format
Reply with one JSON object and nothing else:
{"score": <integer from -10 to 10>, "reason": "<one or two sentences>"}
The score is counted in tenths of the guide's scale: 10 means 1.0, 7 means 0.7, 0 means 0.0,
-6 means -0.6 and -10 means -1.0.
"""

REGION_ANSWER_TEXT = """\
## Answer format
For every Region ID above, in order, write one block of exactly these four lines and end each
block with a line `---`:
Region ID: <id>
Identified Object: <what the box contains>
Score: <number between -1.0 and 1.0>
Reason: <one sentence that justifies the score>

An example block written for another prompt:
Region ID: 1
Identified Object: A brown horse standing in a field.
Score: 0.8
Reason: The horse fits the prompt and looks natural, but one hind leg is blurred.
---
"""

REGION_ANSWER_JSON = """\
## Answer format
Reply with one JSON object and nothing else, with one entry for every Region ID above:
{"regions": [{"id": <region id>, "object": "<what the box contains>", "score": <integer from -10 to 10>, "reason": "<one sentence>"}]}
The score is counted in tenths of the guide's scale: 10 means 1.0, 7 means 0.7, 0 means 0.0,
-6 means -0.6 and -10 means -1.0.
"""

REGION_LINE_TEMPLATE = "Region ID: {id}, box [{x1}, {y1}, {x2}, {y2}]"

GROUNDING_TEMPLATE = """\
# Job: locate the objects named in a prompt
The image is {width} pixels wide and {height} pixels high.
{prompt_line}

List every object or entity that the prompt mentions and that is visible in the image, each
with a tight bounding box in pixels as [x1, y1, x2, y2] (left, top, right, bottom; origin at
the top-left corner; 0 <= x <= {width}, 0 <= y <= {height}). Give every visible instance its
own entry and leave out things the prompt does not mention.

Reply with a JSON list only, for example:
[{{"label": "red apple", "box": {example_a}}}, {{"label": "wooden table", "box": {example_b}}}]
Reply [] when none of them is visible."""


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _prompt_line(prompt: str) -> str:
    """The line carrying the user prompt as a JSON string literal (safe for any content)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return PROMPT_LINE_PREFIX + json.dumps(prompt, ensure_ascii=False)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _region_lines(boxes: Sequence[Sequence[float]]) -> str:
    """``Region ID: k, box [x1, y1, x2, y2]`` lines, ids 1..n, coordinates rounded half up."""
    if len(boxes) == 0:
        raise ValueError("region_prompt needs at least one box")
    lines = []
    for k, box in enumerate(boxes, start=1):
        if len(box) != 4:
            raise ValueError(f"box {k} must have 4 coordinates [x1, y1, x2, y2], got {len(box)}")
        coords = [float(v) for v in box]
        if not all(math.isfinite(v) for v in coords):
            raise ValueError(f"box {k} has a non-finite coordinate: {coords}")
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {k} is inverted (need x1 <= x2 and y1 <= y2): {coords}")
        ints = [_round_half_up(v) for v in coords]
        lines.append(REGION_LINE_TEMPLATE.format(id=k, x1=ints[0], y1=ints[1], x2=ints[2], y2=ints[3]))
    return "\n".join(lines)


def global_layout_prompt(prompt: str, structured: bool = False) -> str:
    """Prompt for the global layout score (spatial intent of ``prompt``; neutral band if none)."""
    answer = SCORE_ANSWER_JSON if structured else SCORE_ANSWER_TEXT
    return GLOBAL_LAYOUT_TEMPLATE.format(prompt_line=_prompt_line(prompt), answer_format=answer)


def region_prompt(prompt: str, boxes: Sequence[Sequence[float]], structured: bool = False) -> str:
    """Hybrid region prompt: regions ``Region ID: k`` (k = 1..n, in the order of ``boxes``).

    ``boxes`` are pixel ``(x1, y1, x2, y2)``; they are rounded half up to integers. Raises
    ``ValueError`` for no boxes, a box without 4 coordinates, a non-finite or inverted box.
    """
    answer = REGION_ANSWER_JSON if structured else REGION_ANSWER_TEXT
    return REGION_TEMPLATE.format(
        prompt_line=_prompt_line(prompt), regions=_region_lines(boxes), answer_format=answer
    )


def sample_level_prompt(prompt: str, structured: bool = False) -> str:
    """One overall score for the whole image: relevance, quality and composition (ablation)."""
    answer = SCORE_ANSWER_JSON if structured else SCORE_ANSWER_TEXT
    return SAMPLE_LEVEL_TEMPLATE.format(prompt_line=_prompt_line(prompt), answer_format=answer)


def grounding_prompt(prompt: str, width: int, height: int) -> str:
    """Ask for the prompt's objects as ``[{"label": str, "box": [x1, y1, x2, y2]}]`` in pixels."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    # Example boxes scaled to this image so that they never contradict the stated bounds.
    fractions = ((0.07, width), (0.23, height), (0.41, width), (0.59, height))
    example_a = [_round_half_up(f * size) for f, size in fractions]
    example_b = [0, _round_half_up(0.49 * height), width, height]
    return GROUNDING_TEMPLATE.format(
        prompt_line=_prompt_line(prompt),
        width=width,
        height=height,
        example_a=json.dumps(example_a),
        example_b=json.dumps(example_b),
    )


# ---------------------------------------------------------------------------------------------
# JSON schemas (bounded: every integer has min/max or an enum, every string a maxLength)
# ---------------------------------------------------------------------------------------------


def _tenths() -> dict[str, Any]:
    return {"type": "integer", "minimum": SCORE_TENTHS[0], "maximum": SCORE_TENTHS[-1]}


def global_json_schema() -> dict[str, Any]:
    """Schema of the structured global / sample-level answer: ``{"score": tenths, "reason": str}``."""
    return {
        "type": "object",
        "properties": {
            "score": _tenths(),
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
        },
        "required": ["score", "reason"],
        "additionalProperties": False,
    }


def regions_json_schema(ids: Sequence[int]) -> dict[str, Any]:
    """Schema of the structured region answer: exactly ``len(ids)`` entries, ``id`` from ``ids``.

    Raises ``ValueError`` when ``ids`` is empty or has duplicates.
    """
    id_list = [int(i) for i in ids]
    if not id_list:
        raise ValueError("regions_json_schema needs at least one region id")
    if len(set(id_list)) != len(id_list):
        raise ValueError(f"region ids must be unique, got {id_list}")
    entry = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "enum": id_list},
            "object": {"type": "string", "maxLength": OBJECT_MAX_CHARS},
            "score": _tenths(),
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
        },
        "required": ["id", "object", "score", "reason"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "regions": {
                "type": "array",
                "items": entry,
                "minItems": len(id_list),
                "maxItems": len(id_list),
            }
        },
        "required": ["regions"],
        "additionalProperties": False,
    }


def grounding_json_schema(
    width: int, height: int, max_objects: int = GROUNDING_MAX_OBJECTS
) -> dict[str, Any]:
    """Schema of the grounding answer: a list (at most ``max_objects``) of ``{label, box}``."""
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    coord = {"type": "integer", "minimum": 0, "maximum": max(int(width), int(height))}
    return {
        "type": "array",
        "maxItems": int(max_objects),
        "items": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "maxLength": LABEL_MAX_CHARS},
                "box": {"type": "array", "items": coord, "minItems": 4, "maxItems": 4},
            },
            "required": ["label", "box"],
            "additionalProperties": False,
        },
    }
