"""Conversations read from OpenAI messages, ShareGPT and Alpaca rows, and rendered for
training with loss on the assistant turns only, found from the tokenizer's own template.

The oracle for the trained tokens is transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` on the same template with ``{% generation %}``
markers around each assistant turn (what TRL's ``assistant_only_loss`` uses); ours needs
no markers. Two templates: the shipped SmolLM2's (ChatML with a default system prompt)
and a Llama-3-style one built here."""

from __future__ import annotations

import pytest

from pipelines.data import chat
from pipelines.data.templates import Encoder
from pipelines.data.validate import Reject

TURNS = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]

#: Llama-3's layout (header tokens, end-of-turn token, no separator after it), its header
#: closed by one newline: Llama-3's own two newlines tokenize as one token with SmolLM2's
#: vocabulary but as two before the answer's first word, which check_template refuses
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>NL' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>NL' }}"
    "{% endif %}")


@pytest.fixture(scope="module")
def smol():
    from pipelines.models import load_tokenizer

    return load_tokenizer("builtin:smollm2")


def _with_generation_markers(tok):
    """SmolLM2's template with TRL-style generation markers around each assistant turn's
    content and end-of-turn marker (the separator newline after it stays outside)."""
    marked = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    # the marked template renders the same text as the shipped one
    assert tok.apply_chat_template(TURNS, tokenize=False, chat_template=marked) == \
        tok.apply_chat_template(TURNS, tokenize=False)
    return marked


def _llama3(smol, newlines: int = 1):
    import copy

    tok = copy.deepcopy(smol)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3.replace("NL", "\n" * newlines)
    return tok


def _oracle_mask(tok, turns, template=None):
    out = tok.apply_chat_template(turns, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, chat_template=template)
    return list(out["input_ids"]), list(out["assistant_masks"])


# -- reading ---------------------------------------------------------------------------------

def test_the_three_formats_read_into_the_same_turns() -> None:
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human",
                                            "assistant": "gpt"}[t["role"]],
                                   "value": t["content"]} for t in TURNS]}
    assert chat.conversation({"messages": TURNS}, "messages") == TURNS
    assert chat.conversation(sharegpt, "sharegpt") == TURNS
    alpaca = {"instruction": "Name the capital of France.", "input": "Answer briefly.",
              "output": "Paris."}
    assert chat.conversation(alpaca, "alpaca") == [
        {"role": "user", "content": "Name the capital of France.\n\nAnswer briefly."},
        {"role": "assistant", "content": "Paris."}]
    assert chat.detect_format(["messages", "id"]) == "messages"
    assert chat.detect_format(["conversations"]) == "sharegpt"
    assert chat.detect_format(["instruction", "output"]) == "alpaca"
    assert chat.detect_format(["prompt", "response"]) is None


@pytest.mark.parametrize(("row", "fmt", "kind", "says"), [
    ({"messages": "hello"}, "messages", "not_a_list", "'messages': expected a list"),
    ({"messages": []}, "messages", "empty_conversation", "no turns"),
    ({"messages": ["hi"]}, "messages", "bad_turn", "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown_role", "'robot'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown_role",
     "conversations[0].from"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages", "empty_turn", "turn 1 (assistant)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no_assistant_turn",
     "no assistant"),
    ({"instruction": "do", "output": 3}, "alpaca", "bad_turn", "'output'"),
])
def test_bad_conversations_are_rejects_with_their_reason(row, fmt, kind, says) -> None:
    got = chat.conversation(row, fmt)
    assert isinstance(got, Reject) and got.kind == kind and got.kind in chat.CHAT_KINDS
    assert says in got.reason


# -- rendering ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["smollm2", "llama3"])
def test_trained_tokens_equal_the_generation_mask_oracle(smol, template) -> None:
    if template == "smollm2":
        tok, marked = smol, _with_generation_markers(smol)
    else:
        tok = _llama3(smol)
        marked = tok.chat_template
    chat.check_template(tok)
    enc = Encoder.from_hf(tok)
    for turns in (TURNS, TURNS[1:], TURNS[1:3]):
        (ids, labels), = chat.render(enc, tok, [turns], max_length=512)
        o_ids, o_mask = _oracle_mask(tok, turns, marked)
        assert ids == o_ids
        ours = [int(x != chat.IGNORE) for x in labels]
        assert ours == o_mask and sum(ours) > 0


def test_a_served_conversation_is_the_prefix_trained_on(smol) -> None:
    """``/v1/chat/completions`` renders the turns so far with the generation prompt and
    tokenizes that text whole: token for token the start of the trained sequence."""
    enc = Encoder.from_hf(smol)
    (ids, labels), = chat.render(enc, smol, [TURNS], max_length=512)
    for i, t in enumerate(TURNS):
        if t["role"] != "assistant":
            continue
        served = smol.apply_chat_template(TURNS[:i], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        assert ids[:len(served)] == list(served)
        assert labels[len(served)] != chat.IGNORE  # the answer starts right there


def test_train_on_last_assistant_or_all(smol) -> None:
    enc = Encoder.from_hf(smol)
    (ids, every), = chat.render(enc, smol, [TURNS], 512)
    (_, last), = chat.render(enc, smol, [TURNS], 512, train_on="last_assistant")
    (_, whole), = chat.render(enc, smol, [TURNS], 512, train_on="all")
    n = lambda labels: sum(x != chat.IGNORE for x in labels)  # noqa: E731
    assert 0 < n(last) < n(every) < n(whole) == len(ids)
    trained_last = smol.decode([x for x in last if x != chat.IGNORE])
    assert trained_last == "Rome is the capital of Italy.<|im_end|>"


def test_truncation_keeps_whole_untrained_turns_out_and_rejects_what_cannot_train(smol) -> None:
    enc = Encoder.from_hf(smol)
    (ids, labels), = chat.render(enc, smol, [TURNS], 512)
    first = next(i for i, x in enumerate(labels) if x != chat.IGNORE)
    cut = first + 3
    (c_ids, c_labels), = chat.render(enc, smol, [TURNS], cut)
    assert c_ids == ids[:cut] and c_labels[-1] != chat.IGNORE
    # a limit inside the second user turn ends the row at the first answer's last token
    second_user = labels.index(chat.IGNORE, first)
    (s_ids, s_labels), = chat.render(enc, smol, [TURNS], second_user + 2)
    assert len(s_ids) == second_user and s_labels[-1] != chat.IGNORE
    (too_long,) = chat.render(enc, smol, [TURNS], first)
    assert isinstance(too_long, Reject) and too_long.kind == "too_long"


def test_a_template_without_stable_prefixes_is_refused_naming_the_fix(smol) -> None:
    import copy

    tok = copy.deepcopy(smol)
    # the system line counts the turns: each later turn rewrites the start of the text
    tok.chat_template = ("{{ 'turns: ' + messages|length|string + '\n' }}{% for m in messages %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(chat.ChatTemplateError, match="data.chat_template"):
        chat.check_template(tok)
    tok.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.check_template(tok)
    # the prompt ends in "\n\n" (one token) where the conversation has "\n" + "\nRome"
    with pytest.raises(chat.ChatTemplateError, match="token boundary"):
        chat.check_template(_llama3(smol, newlines=2))


def test_a_conversation_the_template_refuses_is_a_role_order_reject(smol) -> None:
    import copy

    tok = copy.deepcopy(smol)
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    enc = Encoder.from_hf(tok)
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]
    (got,) = chat.render(enc, tok, [two_users], 64)
    assert isinstance(got, Reject) and got.kind == "role_order" and "alternate" in got.reason
