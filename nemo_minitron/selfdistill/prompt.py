"""The rewrite prompt: the teacher sees the instruction and the reference answer and writes its
own answer (self-data distillation, arXiv 2410.09982).

A template is Python ``str.format`` text with the fields ``{instruction}`` (the last user turn)
and ``{reference}`` (the example's answer); literal braces are doubled. The filled template
replaces the last user turn, earlier turns (system prompt, conversation) stay, and the result is
rendered with the teacher's chat template (``data.instruct.render_prompt``).
"""

from __future__ import annotations

import string

from nemo_minitron.config import ConfigError
from nemo_minitron.data.instruct import Example

DEFAULT_REWRITE_TEMPLATE = (
    "{instruction}\n\n"
    "Here is a reference answer to this request:\n\n"
    "{reference}\n\n"
    "Using the reference answer as a guide, write your own response to the request above. "
    "Answer the request directly, in your own words, and do not mention the reference answer."
)
"""The default, in the spirit of the published prompt ("Using the reference answer as a guide,
write your own response")."""

FIELDS = ("instruction", "reference")


def check_template(template: str, where: str = "prompt template") -> str:
    """``template`` if it is a valid rewrite template, else a one-line error."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (literal braces are written {{{{ and }}}})") from None
    unknown = sorted(f for f in fields if f not in FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {{{unknown[0]}}} (known: "
                          f"{', '.join('{' + f + '}' for f in FIELDS)})")
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise ConfigError(f"{where}: needs the field {{{missing[0]}}}")
    return template


def instruction_of(example: Example) -> str:
    """The last user turn of the prompt ("" without one)."""
    users = [m["content"] for m in example.prompt_messages if m["role"] == "user"]
    return users[-1] if users else ""


def rewrite_messages(example: Example, template: str = DEFAULT_REWRITE_TEMPLATE
                     ) -> list[dict[str, str]]:
    """The teacher's prompt turns: the last user turn becomes the filled template (appended
    as a new user turn when the prompt has none)."""
    text = template.format(instruction=instruction_of(example), reference=example.response)
    messages = [dict(m) for m in example.prompt_messages]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        messages.append({"role": "user", "content": text})
    else:
        messages[last_user]["content"] = text
    return messages
