"""Chat messages to prompt text: the checkpoint's Jinja template when it has one (rendered
in a sandbox, as transformers does), else the documented Llama-2 default."""

from __future__ import annotations

import json

import pytest

from engine.chat_template import ChatTemplate, ChatTemplateError

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Colour?"},
]


def test_default_is_llama2_without_special_tokens():
    t = ChatTemplate.for_checkpoint(None)
    assert t.name == "llama-2 (default)"
    assert t.render(MSGS) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. [INST] Colour? [/INST]"
    assert not t.adds_bos(t.render(MSGS))
    with pytest.raises(ChatTemplateError, match="last message"):
        t.render(MSGS[:3])
    with pytest.raises(ChatTemplateError, match="only the first"):
        t.render([MSGS[1], MSGS[0], MSGS[3]])


def test_a_checkpoint_template_is_used_with_its_tokens(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    t = ChatTemplate.for_checkpoint(str(tmp_path))
    text = t.render(MSGS[1:])
    assert t.name == "checkpoint" and text == "<s><|user|>Hi</s><|assistant|>Hello.</s><|user|>Colour?</s><|assistant|>"
    assert t.adds_bos(text)  # the server then encodes without a second BOS
    with pytest.raises(ChatTemplateError, match="no system"):
        t.render(MSGS)


def test_the_sandbox_refuses_what_a_template_should_not_do(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(ChatTemplateError, match="cannot render"):
        ChatTemplate.for_checkpoint(str(tmp_path)).render(MSGS[1:2])
