"""Chat messages to prompt text, for `POST /v1/chat/completions`.

A checkpoint whose tokenizer_config.json has a `chat_template` (Jinja, as Hugging Face
writes it) is rendered with that template in a sandbox, with `messages`, `bos_token`,
`eos_token` and `add_generation_prompt=True`, as transformers' apply_chat_template does.
Otherwise (the shipped sentencepiece tokenizer, random-weight presets) the default is
Llama-2's chat format without special tokens:

    [INST] <<SYS>>
    {system}
    <</SYS>>

    {user} [/INST] {assistant} [INST] {user} [/INST]

The engine's tokenizer adds BOS itself; a rendered text that starts with the BOS token's
text is encoded without a second one (`adds_bos`).
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """Messages the template cannot render (the server answers 400)."""


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "<s>", eos_token: str = "</s>"):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._compiled = None

    @classmethod
    def for_checkpoint(cls, path: str | None) -> ChatTemplate:
        """The checkpoint's own template when its tokenizer_config.json has one, else the default."""
        config = Path(path) / "tokenizer_config.json" if path else None
        if config is None or not config.is_file():
            return cls()
        data = json.loads(config.read_text())
        template = data.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(
            template if isinstance(template, str) else None,
            _token(data, "bos_token", "<s>"),
            _token(data, "eos_token", "</s>"),
        )

    @property
    def name(self) -> str:
        return "checkpoint" if self.source else "llama-2 (default)"

    def render(self, messages: list[dict]) -> str:
        if self.source is None:
            return _llama2(messages)
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._compiled = env.from_string(self.source)
        try:
            return self._compiled.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=True
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # the template's own error, in the client's words
            raise ChatTemplateError(f"the model's chat template cannot render these messages: {e}") from None

    def adds_bos(self, text: str) -> bool:
        """Whether `text` (rendered) already starts with the BOS token's text."""
        return bool(self.bos_token) and text.startswith(self.bos_token)


def _raise(message: str):
    raise ChatTemplateError(message)


def _token(data: dict, key: str, default: str) -> str:
    v = data.get(key)
    if isinstance(v, dict):  # {"content": "<s>", ...}
        v = v.get("content")
    return v if isinstance(v, str) else default


def _llama2(messages: list[dict]) -> str:
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts, pending_system = [], system
    for m in messages:
        if m["role"] == "system":
            raise ChatTemplateError("only the first message may have the role 'system'")
        if m["role"] == "user":
            user = m["content"]
            if pending_system:
                user, pending_system = f"<<SYS>>\n{pending_system}\n<</SYS>>\n\n{user}", ""
            parts.append(f"[INST] {user} [/INST]")
        else:
            parts.append(f" {m['content']} ")
    if not messages or messages[-1]["role"] != "user":
        raise ChatTemplateError("the last message must have the role 'user'")
    return "".join(parts)
