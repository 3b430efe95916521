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


def question_turn(task: Task, question: str, template: str | None = None) -> str:
    """The user turn that asks ``question``: a user task's own prompt builder, or the template."""
    if task.prompt is not None and template is None:
        return task.prompt(question)
    return user_turn(template or task.template, question)


def build_prompt(engine: Engine, task: Task, question: Question, template: str | None = None) -> str:
    """The question as the model's chat template renders it, after the task's k-shot examples
    (each a user turn and the worked answer as the assistant's turn)."""
    messages: list[dict[str, str]] = []
    if task.prompt is None or template is not None:
        for shot in task.shots:
            messages.append({"role": "user", "content": question_turn(task, shot.question, template)})
            messages.append({"role": "assistant", "content": _worked(shot)})
    messages.append({"role": "user", "content": question_turn(task, question.question, template)})
    return engine.apply_chat_template(messages)
