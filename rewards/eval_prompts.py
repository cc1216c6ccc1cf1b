"""The evaluation prompt: how a VLM grades a generated image for a benchmark, kept apart from the reward
prompts of :mod:`rewards.prompts` so the policy is never graded by the question it trained on.

It follows the protocol of the SRUM authors' T2I-CompBench evaluation (a Qwen2.5-VL grader): one score
from 0 to 100 per image for how well it corresponds to the prompt, judged on the objects, their attributes,
spatial layout and actions, in five bands, answered as JSON with the score and a short explanation. The text
below is our own. On top of the common bands each benchmark category gets a rubric line saying what matters
most for it (:data:`RUBRICS`: T2I-CompBench's categories, GenEval's tags); an unknown or missing category
gets the general rubric.

* :func:`evaluation_prompt` builds the request; ``structured=True`` asks for JSON matching
  :func:`evaluation_json_schema` (``{"score": 0..100, "explanation": str}``, bounded so grammar-guided
  decoding terminates), ``structured=False`` for the lines ``Score: <0-100>`` / ``Explanation: ...``.
* :func:`parse_evaluation` reads either form; a score outside 0..100 or missing is a parse failure (never
  clamped into a grade).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EXPLANATION_MAX_CHARS", "GENERIC_RUBRIC", "RUBRICS", "SCORE_MAX", "EvalAnswer", "evaluation_json_schema",
           "evaluation_prompt", "parse_evaluation", "rubric_for"]

SCORE_MAX = 100
EXPLANATION_MAX_CHARS = 160

GENERIC_RUBRIC = ("Weigh every part of the prompt: the objects it names and how many, their attributes "
                  "(colour, shape, texture, material), where they are relative to each other, and what they do.")

RUBRICS: dict[str, str] = {
    # T2I-CompBench
    "color": "Above all check that each object has the colour the prompt gives it, and that the colours are "
             "not swapped between objects or spilled onto other things.",
    "shape": "Above all check that each object has the shape the prompt gives it (round, square, oval, "
             "triangular, ...) and that the shapes belong to the right objects.",
    "texture": "Above all check that each object shows the texture or material the prompt gives it (wooden, "
               "metallic, fluffy, glass, ...) and that textures are not swapped between objects.",
    "spatial": "Above all check the 2D relation between the objects (left of, right of, above, below, next to): "
               "both objects must be present and placed as stated.",
    "3d_spatial": "Above all check the depth relation between the objects (in front of, behind, hidden by): both "
                  "objects must be present and the occlusion or depth order must match the prompt.",
    "non-spatial": "Above all check the interaction or action between the subjects (holding, riding, looking "
                   "at, playing with, ...): who does what to whom must match the prompt.",
    "numeracy": "Above all count: each object must appear exactly as many times as the prompt says.",
    "complex": "The prompt combines several attributes, relations and actions: check each of them and lower the "
               "score for every one that is missing or wrong.",
    "complex_action": "The prompt combines subjects with actions and attributes: check who does what, and each "
                      "attribute, and lower the score for every one that is missing or wrong.",
    "complex_spatial": "The prompt combines several objects with spatial relations and attributes: check every "
                       "relation and attribute, and lower the score for every one that is missing or wrong.",
    # GenEval
    "single_object": "The prompt asks for one object: it must be present, recognisable and complete.",
    "two_object": "The prompt asks for two different objects: both must be present and recognisable.",
    "counting": "Above all count: the object must appear exactly as many times as the prompt says.",
    "colors": "Above all check that the object has exactly the colour the prompt names.",
    "position": "Above all check the relative position of the two objects (left of, right of, above, below): "
                "both must be present and placed as stated.",
    "color_attr": "Above all check attribute binding: each of the two objects must have its own colour from the "
                  "prompt, not the other object's.",
}

EVAL_TEMPLATE = """\
# Task: grade how well a generated image matches its text prompt
You are an evaluator of text-to-image models. Look at the image and decide how faithfully it
shows what the prompt describes: the objects and their number, their attributes (colour, shape,
texture), their spatial layout and the actions or relations between them. Grade the content,
not the artistic style.

Text prompt: {prompt}

## What matters most for this prompt ({category})
{rubric}

## Score from 0 to 100
- 81 to 100: the image matches the prompt completely; nothing is missing or wrong.
- 61 to 80: most objects, attributes, relations and actions are right, with small discrepancies.
- 41 to 60: some of the prompt is shown, but key parts or details are missing or wrong.
- 21 to 40: few of the requested elements are there, and the relations or actions do not match.
- 0 to 20: the image does not convey the prompt (wrong or missing subject, or broken image).

{answer_format}"""

ANSWER_JSON = """\
## Answer
Reply with one JSON object and nothing else:
{"score": <integer from 0 to 100>, "explanation": "<at most 20 words>"}"""

ANSWER_TEXT = """\
## Answer
Reply with exactly two lines:
Score: <integer from 0 to 100>
Explanation: <at most 20 words>"""


def rubric_for(category: str | None) -> tuple[str, str]:
    """``(rubric key, rubric text)`` for a benchmark category; ``("general", ...)`` when unknown."""
    key = (category or "").strip().lower()
    return (key, RUBRICS[key]) if key in RUBRICS else ("general", GENERIC_RUBRIC)


def evaluation_prompt(prompt: str, category: str | None = None, structured: bool = True) -> str:
    """The grading request for an image generated from ``prompt`` (a benchmark ``category`` picks the rubric).

    The prompt is embedded as a JSON string literal, so it cannot break the template or inject answer lines."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"evaluation_prompt needs a non-empty prompt, got {prompt!r}")
    key, rubric = rubric_for(category)
    return EVAL_TEMPLATE.format(prompt=json.dumps(prompt, ensure_ascii=False), category=key, rubric=rubric,
                                answer_format=ANSWER_JSON if structured else ANSWER_TEXT)


def evaluation_json_schema() -> dict[str, Any]:
    """Schema of the structured grade: ``{"score": integer 0..100, "explanation": string}``."""
    return {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": SCORE_MAX},
            "explanation": {"type": "string", "maxLength": EXPLANATION_MAX_CHARS},
        },
        "required": ["score", "explanation"],
        "additionalProperties": False,
    }


class EvalAnswer(BaseModel):
    """A grading answer as read: ``score`` 0..100 (None when none could be read) and the explanation."""

    model_config = ConfigDict(frozen=True)
    score: int | None = Field(description="grade 0..100; None when the answer has no valid grade")
    explanation: str = Field("", description="the evaluator's explanation")
    problem: str | None = Field(None, description="why no grade was read (None when it was)")


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_SCORE_LINE = re.compile(r"(?im)^\W*score\W*[:=]\s*(-?\d+(?:\.\d+)?)")
_EXPL_LINE = re.compile(r"(?im)^\W*(?:explanation|reason)\W*[:=]\s*(.+)$")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def _grade(value: Any) -> tuple[int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, f"score is not a number: {value!r}"
    try:
        number = float(value)
    except ValueError:
        return None, f"score is not a number: {value!r}"
    if number != int(number):
        return None, f"score is not an integer: {value!r}"
    if not 0 <= number <= SCORE_MAX:
        return None, f"score {value!r} is outside 0..{SCORE_MAX}"
    return int(number), None


def parse_evaluation(text: Any) -> EvalAnswer:
    """Read a grade from a JSON answer (``{"score", "explanation"}``, fenced or inside prose) or from
    ``Score:`` / ``Explanation:`` lines; never raises."""
    if not isinstance(text, str) or not text.strip():
        return EvalAnswer(score=None, problem="empty answer")
    body = _THINK.sub("", text).replace("```json", "```").replace("```", " ").strip()
    match = _JSON_OBJECT.search(body)
    if match:
        try:
            doc = json.loads(match.group(0))
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "score" in doc:
            score, problem = _grade(doc["score"])
            expl = doc.get("explanation", doc.get("reason", ""))
            return EvalAnswer(score=score, explanation=str(expl or "")[:EXPLANATION_MAX_CHARS * 2], problem=problem)
    line = _SCORE_LINE.search(body)
    if line is None:
        return EvalAnswer(score=None, explanation=body[:200], problem="no score in the answer")
    score, problem = _grade(line.group(1))
    expl = _EXPL_LINE.search(body)
    return EvalAnswer(score=score, explanation=(expl.group(1).strip() if expl else ""), problem=problem)
