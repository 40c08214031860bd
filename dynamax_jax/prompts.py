"""Prompts as token ids: the chat template and the model's stop tokens."""

from __future__ import annotations

import numpy as np


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of the prompt, via the chat template when ``chat`` and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in np.asarray(ids).reshape(-1)]
    return list(tokenizer.encode(text))


def reply_marker(tokenizer) -> list[int] | None:
    """Token ids the chat template puts before the assistant's reply (its generation prompt,
    e.g. ``<|im_start|>assistant\n``); None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turn = [{"role": "user", "content": "Q"}]
    with_prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
    if not with_prompt.startswith(without) or with_prompt == without:
        return None
    ids = tokenizer.encode(with_prompt[len(without):], add_special_tokens=False)
    return [int(i) for i in (ids.ids if hasattr(ids, "ids") else ids)] or None


def stop_ids(config, tokenizer) -> list[int]:
    """The model's end-of-sequence ids (from its config and its tokenizer)."""
    ids = set()
    eos = config.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    tid = getattr(tokenizer, "eos_token_id", None)
    if tid is not None:
        ids.add(int(tid))
    return sorted(ids)
