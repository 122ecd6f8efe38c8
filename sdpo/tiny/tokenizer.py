"""A character-level tokenizer with a ChatML chat template, built locally (no hub).

Every printable ASCII character and "\\n" is one token, so ids are deterministic and decoding gives
back the exact text; any other character becomes its UTF-8 bytes (one token each), so nothing is
ever lost or mapped to ``<unk>``. The special tokens follow Qwen's names so code written for
Qwen-style models (eos = ``<|im_end|>``, pad = ``<|endoftext|>``) runs unchanged on the tiny model.

Why a byte-level BPE with no merges rather than a WordLevel vocabulary: transformers 5 loads the
tokenizer of any directory whose config.json says ``model_type: qwen2`` as ``Qwen2Tokenizer``,
whatever tokenizer_config.json says, and that class rebuilds its own pipeline (byte-level BPE) from
the saved vocabulary. A WordLevel character vocabulary then silently loses every "\\n". Building the
tokenizer as that very class makes the saved and the re-loaded tokenizer the same thing.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

from sdpo.chat import chat_ids  # noqa: F401  (re-exported: part of the tiny API)

UNK, PAD, BOS_CHAT, EOS = "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, PAD, BOS_CHAT, EOS]  # ids 0..3; byte b has id 4 + b

# ChatML. `enable_thinking` is accepted by the renderer (extra kwargs become template variables) and
# ignored: the tiny model has no thinking mode. Tools follow Qwen2.5/Qwen3's (Hermes) convention, kept
# short for a small context: the tool names in a system turn, a call as
# `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` after the assistant's content, and
# consecutive `tool` messages in one user turn, each as `<tool_response>\n...\n</tool_response>`.
# Without tools and tool messages it renders exactly the plain ChatML above (same ids as before).
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n<tools>' -}}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool.function if tool.function is defined else tool -%}"
    "{{- (' ' if not loop.first else '') + fn.name -}}"
    "{%- endfor -%}"
    "{{- '</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] -}}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def byte_symbols() -> list[str]:
    """The symbol byte-level BPE uses for each byte value 0..255 (GPT-2's mapping): printable bytes
    stand for themselves, the others (space, "\\n", control bytes, ...) are shifted to chr(256 + k)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + byte_symbols())}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],  # no merges: one token per byte, so one per ASCII character
        unk_token=UNK,
        bos_token=None,  # as Qwen: the chat template starts with <|im_start|>
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[BOS_CHAT],
        clean_up_tokenization_spaces=False,  # it would rewrite " ," and " ." in decoded text
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )


