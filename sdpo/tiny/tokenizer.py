"""A character-level tokenizer with a ChatML chat template, built locally (no hub).

Every printable ASCII character and "\\n" is one token, so ids are deterministic and decoding gives
back the exact text. The special tokens follow Qwen's names so code written for Qwen-style models
(eos = ``<|im_end|>``, pad = ``<|endoftext|>``) runs unchanged on the tiny model.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, PAD, BOS_CHAT, EOS = "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, PAD, BOS_CHAT, EOS]  # ids 0..3
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]  # ids 4..99

# ChatML. `enable_thinking` is accepted by the renderer (extra kwargs become template variables) and
# ignored: the tiny model has no thinking mode.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters ("[\s\S]" rather than ".", which would skip "\n"); special
    # tokens are matched before this step, as added tokens.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel's default decoding joins tokens with spaces; Fuse concatenates them as they are.
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[BOS_CHAT],
        clean_up_tokenization_spaces=False,  # it would rewrite " ," and " ." in decoded text
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )
    return tok


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, as a plain ``list[int]``.

    transformers 5 made ``return_dict=True`` the default of ``apply_chat_template`` (a BatchEncoding
    comes back), while 4.x returned a list; ``return_dict=False`` gives the list on both, and the
    checks below cover a dict or a batched (nested) answer from other tokenizer classes.
    """
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **template_kwargs
    )
    if hasattr(out, "keys"):  # BatchEncoding / dict
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # tensor / array
        out = out.tolist()
    if len(out) > 0 and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(i) for i in out]
