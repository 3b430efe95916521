"""Chat-formatted evaluation prompts: zero-shot chain of thought, or k worked examples first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftscale.errors import InvalidArgument
from peftscale.train.data import without_calculator_notes

if TYPE_CHECKING:
    from peftscale.engine import Engine
    from peftscale.eval.datasets import Question, Task


TEMPLATES = {
    "plain": "{question}",
    "cot": "{question}\n\nLet's think step by step.",
}
"""Named templates for ``template=``: the bare question, or zero-shot chain of thought."""


def user_turn(template: str, question: str) -> str:
    """``template`` (a name from :data:`TEMPLATES` or a text) with ``{question}`` replaced (other
    braces, such as LaTeX's, are left alone)."""
    template = TEMPLATES.get(template, template)
    if "{question}" not in template:
        raise InvalidArgument(
            f"invalid argument: a prompt template needs a '{{question}}' placeholder or one of the names "
            f"{', '.join(TEMPLATES)}; got {template!r}"
        )
    return template.replace("{question}", question)


def _worked(shot: Question) -> str:
    if shot.solution is None:
        raise InvalidArgument(f"invalid argument: example {shot.id} has no worked solution for a k-shot prompt")
    # As in training.
    return without_calculator_notes(shot.solution)


def build_prompt(engine: Engine, task: Task, question: Question, template: str | None = None) -> str:
    """The question as the model's chat template renders it, after the task's k-shot examples
    (each a user turn and the worked answer as the assistant's turn)."""
    if task.prompt is not None and template is None:
        # A user task's own prompt builder: the whole user turn.
        return engine.apply_chat_template([{"role": "user", "content": task.prompt(question.question)}])
    template = template or task.template
    messages: list[dict[str, str]] = []
    for shot in task.shots:
        messages.append({"role": "user", "content": user_turn(template, shot.question)})
        messages.append({"role": "assistant", "content": _worked(shot)})
    messages.append({"role": "user", "content": user_turn(template, question.question)})
    return engine.apply_chat_template(messages)
