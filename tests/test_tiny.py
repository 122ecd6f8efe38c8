"""The embedded tiny model: tokenizer, architecture and warm start (CPU, no network).

The warm-start build takes ~2 minutes on 2 cores; it runs once per session at most (module fixture)
and not at all when ``$SDPO_CACHE_DIR`` (or ~/.cache/sdpo) already holds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from environments.arithmetic import split_pairs
from models.tiny_arithmetic import ensure_tiny_model, success_rate, teacher_user_text, train_tiny_model
from sdpo.config import TeacherContextConfig
from sdpo.tiny.cache import REQUIRED_FILES
from sdpo.tiny.model import tiny_model_config
from sdpo.tiny.tokenizer import build_tokenizer, chat_ids

MESSAGES = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "37+58"},
    {"role": "assistant", "content": "95"},
    {"role": "user", "content": "10+11"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_teacher_templates_round_trip(tok):
    t = TeacherContextConfig()
    text = t.reprompt_template.format(
        prompt="37+58",
        solution=t.solution_template.format(successful_previous_attempt="95"),
        feedback=t.feedback_template.format(feedback_raw="94 is too low."),
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_exact(tok):
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text == (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n"
        "<|im_start|>user\n37+58<|im_end|>\n"
        "<|im_start|>assistant\n95<|im_end|>\n"
        "<|im_start|>user\n10+11<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False, tokenize=False)
    assert no_prompt == "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n37+58<|im_end|>\n"
    # enable_thinking is accepted and changes nothing.
    assert text == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, enable_thinking=True)


def test_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.unk_token is not None
    assert len({tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("<|im_start|>")}) == 4
    ids = tok.encode("<|im_start|>user\n1+2<|im_end|>\n", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-2] == tok.eos_token_id
    assert len(ids) == 1 + 5 + 3 + 1 + 1  # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "user\n1+2\n"
    ids = tok.encode("é€", add_special_tokens=False)  # outside ASCII: one token per UTF-8 byte, lossless
    assert len(ids) == 2 + 3 and tok.unk_token_id not in ids and tok.decode(ids) == "é€"
    assert tok.encode("ab", add_special_tokens=True) == tok.encode("ab", add_special_tokens=False)  # no BOS


def test_chat_ids_is_a_plain_list(tok):
    ids = chat_ids(tok, MESSAGES, enable_thinking=False)
    assert type(ids) is list and all(type(i) is int for i in ids)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("with_model_config", [False, True])
def test_save_load_round_trip(tok, tmp_path, with_model_config):
    # Next to a qwen2 config.json, as in a model directory, transformers 5 loads the tokenizer as
    # Qwen2Tokenizer, which rebuilds its own pipeline from the vocabulary: it must come out the same.
    if with_model_config:
        tiny_model_config(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert chat_ids(loaded, MESSAGES) == chat_ids(tok, MESSAGES)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded.get_vocab() == tok.get_vocab()
    text = teacher_user_text("37+58", "95")
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.decode(chat_ids(loaded, MESSAGES), skip_special_tokens=True) == (
        "system\nAnswer with a number.\nuser\n37+58\nassistant\n95\nuser\n10+11\nassistant\n"
    )


def test_model_config(tok):
    config = tiny_model_config(len(tok))
    assert config.hidden_size // config.num_attention_heads == 32  # in vLLM-CPU's head_dim list
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    assert config.vocab_size == len(tok) == 260  # 4 specials + 256 bytes


@pytest.mark.slow
def test_build_is_deterministic():
    (m1, _, a), (m2, _, b) = (train_tiny_model(max_steps=2, log=lambda _: None) for _ in range(2))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert a["history"] == b["history"]


@pytest.fixture(scope="module")
def tiny_path():
    # The default cache dir ($SDPO_CACHE_DIR, else ~/.cache/sdpo), so that one build serves every
    # test file and later runs.
    return ensure_tiny_model()


@pytest.mark.slow
def test_warmstart_metrics(tiny_path):
    assert all(os.path.isfile(os.path.join(tiny_path, f)) for f in REQUIRED_FILES)
    with open(os.path.join(tiny_path, "warmstart.json")) as fh:
        m = json.load(fh)
    assert m["heldout_success_t1"] >= 0.03  # partly competent: RL needs some successes to start from
    assert m["with_solution_success_t1"] >= 0.7
    # The teacher must really be better than the student: that is what SDPO distils.
    assert m["with_solution_success_t1"] > m["heldout_success_t1"] + 0.3


@pytest.mark.slow
def test_saved_model_reproduces_its_metrics(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.tie_word_embeddings is False
    with open(os.path.join(tiny_path, "warmstart.json")) as fh:
        m = json.load(fh)
    test = split_pairs("test")
    # Same weights, same sampling seed: the numbers recorded at build time come back exactly.
    assert success_rate(model, tok, test, temperature=1.0) == m["heldout_success_t1"]
    assert success_rate(model, tok, test, temperature=0.0) == m["heldout_success_greedy"]


@pytest.mark.slow
def test_ensure_returns_existing_at_once(tiny_path):
    start = time.perf_counter()
    assert ensure_tiny_model(os.path.dirname(tiny_path)) == tiny_path
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_cli_uses_existing(tiny_path):
    out = subprocess.run(
        [sys.executable, "-m", "models.tiny_arithmetic", "--cache-dir", os.path.dirname(tiny_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert out.stdout.splitlines()[0] == tiny_path
    assert "building" not in out.stdout
