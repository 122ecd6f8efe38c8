"""Multi-turn episodes (SPEC 2a): the tiny chat template's tool convention, tool-call parsing from
the template, episode assembly (ids, loss masks, log-prob alignment), limits, failing tools, and
teacher contexts on episodes. Pure Python and the tiny tokenizer: no Ray, no model.

The engine here is a script: each call returns the next turn's token ids and made-up log-probs,
and records the contexts it was given, so that every id and mask can be checked exactly (the real
engines are tested in test_rollout.py; they are driven through the same ``generate`` signature).
"""

from __future__ import annotations

import time

import pytest

from environments import Task, Verdict
from environments.multi_turn import MultiTurnEnvironment, function_tool
from sdpo.batch import build_batch
from sdpo.chat import chat_ids
from sdpo.config import TeacherContextConfig
from sdpo.episodes import EpisodeLimits, demonstration_text, demonstration_turns, observation_ids, run_episodes
from sdpo.rollout.base import Completion, Sampling
from sdpo.tiny.tokenizer import build_tokenizer
from sdpo.tool_calls import ToolCallFormat

OLD_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def call_text(name: str, **arguments) -> str:
    import json

    return '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (name, json.dumps(arguments))


class Adder(MultiTurnEnvironment):
    tools = [function_tool("add", "Add two integers", a="integer", b="integer")]

    def __init__(self, hang_s: float = 0.0):
        self.hang_s, self.steps = hang_s, 0

    def tasks(self, split):
        return [Task("t0", [{"role": "user", "content": "2+3?"}], {"answer": "5"})]

    def verify(self, task, completion):
        ok = completion.strip() == task.data["answer"]
        return Verdict(float(ok), None if ok else f"expected {task.data['answer']}")

    def call_tool(self, state, name, arguments):
        self.steps += 1
        if arguments.get("a") == "boom":
            raise RuntimeError("boom")
        if self.hang_s:
            time.sleep(self.hang_s)
        return str(arguments["a"] + arguments["b"])


class Script:
    """A ``generate`` that answers each call with scripted turns: ``turns[k]`` is the k-th text a
    given episode writes (the same script for every episode unless ``per_episode``)."""

    def __init__(self, tok, turns, eos=True, per_episode=None):
        self.tok, self.turns, self.eos, self.per_episode = tok, turns, eos, per_episode
        self.calls, self.counter = [], 0

    def completion(self, text):
        ids = self.tok.encode(text, add_special_tokens=False) + ([self.tok.eos_token_id] if self.eos else [])
        logprobs = [-(self.counter + i + 1) / 100 for i in range(len(ids))]  # distinct: alignment shows
        self.counter += len(ids)
        return Completion(ids, logprobs, "stop" if self.eos else "length", policy_version=3)

    def __call__(self, prompts, sampling):
        self.calls.append(([list(p) for p in prompts], sampling))
        rnd = len(self.calls) - 1  # every unfinished episode has had the same number of turns
        if rnd == 0:
            self.prompt_len, self.firsts = len(prompts[0]), []
        out = []
        for i, prompt in enumerate(prompts):
            group = []
            for j in range(sampling.n):
                if rnd == 0:
                    k = i * sampling.n + j
                else:  # which episode this context is: the one whose first turn it starts with
                    rest = prompt[self.prompt_len:]
                    k = next(k for k, first in enumerate(self.firsts) if rest[: len(first)] == first)
                turns = self.per_episode[k] if self.per_episode else self.turns
                group.append(self.completion(turns[min(rnd, len(turns) - 1)]))
                if rnd == 0:
                    self.firsts.append(group[-1].token_ids)
            out.append(group)
        return out


def sampling(tok, n=1):
    return Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=512, stop_token_ids=(tok.eos_token_id,), seed=7)


def limits(turns=4, tokens=400, timeout=5.0):
    return EpisodeLimits(max_turns=turns, max_tokens=tokens, tool_timeout_s=timeout)


# ---------------------------------------------------------------- the chat template's conventions

def test_tiny_template_renders_plain_chats_exactly_as_before(tok):
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}]
    old = build_tokenizer()
    old.chat_template = OLD_TEMPLATE
    for gen in (True, False):
        assert chat_ids(tok, chat, add_generation_prompt=gen) == chat_ids(old, chat, add_generation_prompt=gen)


def test_tool_call_format_is_read_from_the_template_and_parses_what_it_renders(tok):
    fmt = ToolCallFormat.from_tokenizer(tok)
    assert (fmt.opening, fmt.closing, fmt.name_key, fmt.arguments_key) == ("<tool_call>", "</tool_call>", "name", "arguments")
    calls = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 22}}},
             {"type": "function", "function": {"name": "neg", "arguments": {"x": "y z"}}}]
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me.",
                                        "tool_calls": calls}], tokenize=False)
    turn = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert fmt.parse(turn) == {"role": "assistant", "content": "Let me.", "tool_calls": [
        {"name": "add", "arguments": {"a": 1, "b": 22}}, {"name": "neg", "arguments": {"x": "y z"}}]}
    assert fmt.parse("just 5") == {"role": "assistant", "content": "just 5"}
    bad = fmt.parse("<tool_call>\n{nope}\n</tool_call>")["tool_calls"][0]
    assert bad["name"] is None and "not valid JSON" in bad["error"]
    assert "no closing" in fmt.parse('<tool_call>\n{"name": "add"')["tool_calls"][0]["error"]


def test_a_template_without_tool_calls_is_refused(tok):
    plain = build_tokenizer()
    plain.chat_template = OLD_TEMPLATE  # ignores tool_calls
    with pytest.raises(ValueError, match="tool_calls"):
        ToolCallFormat.from_tokenizer(plain)


# ---------------------------------------------------------------- episode assembly

def test_episode_ids_masks_and_logprobs_across_turns(tok):
    env = Adder()
    script = Script(tok, [call_text("add", a=2, b=3), "5"])
    [[ep]] = run_episodes(script, tok, env, env.tasks("train"), sampling(tok), limits())
    assert ep.verdict.reward == 1.0 and ep.turns == 2 and env.steps == 1
    eos = tok.eos_token_id
    turn1 = tok.encode(call_text("add", a=2, b=3), add_special_tokens=False) + [eos]
    turn2 = tok.encode("5", add_special_tokens=False) + [eos]
    obs = tok.encode("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)
    assert ep.token_ids == turn1 + obs + turn2
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    # one log-prob per model token, in order: the engine's values of turn 1 then turn 2
    assert ep.logprobs == [-(i + 1) / 100 for i in range(len(turn1) + len(turn2))]
    assert ep.policy_version == 3
    # the prompt carries the tools; round 2's context is the prompt, turn 1 and the observation, as ids
    assert ep.prompt_ids == chat_ids(tok, env.tasks("train")[0].messages, tools=env.tools)
    assert script.calls[1][0] == [ep.prompt_ids + turn1 + obs]
    # and the whole episode is exactly the template's rendering of the conversation it stands for
    conversation = env.tasks("train")[0].messages + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5"}]
    assert ep.prompt_ids + ep.token_ids == chat_ids(tok, conversation, add_generation_prompt=False, tools=env.tools)[:-1]
    assert [m["role"] for m in ep.messages] == ["assistant", "tool", "assistant"]


def test_n_episodes_per_task_are_drawn_in_one_first_call_then_one_per_turn(tok):
    env = Adder()
    script = Script(tok, None, per_episode=[[call_text("add", a=1, b=1), "2"], ["5"], [call_text("add", a=2, b=3), "5"]])
    [group] = run_episodes(script, tok, env, env.tasks("train"), sampling(tok, n=3), limits())
    assert [e.turns for e in group] == [2, 1, 2] and [e.verdict.reward for e in group] == [0.0, 1.0, 1.0]
    (first, s0), (second, s1) = script.calls
    assert len(first) == 1 and s0.n == 3  # the prompt once, n samples
    assert len(second) == 2 and s1.n == 1 and s1.seed != s0.seed  # the two unfinished episodes, a new stream


def test_turn_limit_ends_the_episode_with_reward_0_and_feedback(tok):
    env = Adder()
    script = Script(tok, [call_text("add", a=1, b=1)])  # calls the tool forever
    [[ep]] = run_episodes(script, tok, env, env.tasks("train"), sampling(tok), limits(turns=2))
    assert ep.turns == 2 and env.steps == 1  # the last turn's call is not run
    assert ep.verdict.reward == 0.0 and ep.verdict.info["episode_end"] == "turn_limit" and "2 turns" in ep.verdict.feedback
    assert ep.loss_mask[-1] == 1  # it ends on the model's turn, not on an observation


def test_token_budget_cuts_the_turn_and_ends_the_episode(tok):
    env = Adder()
    turn1 = len(tok.encode(call_text("add", a=2, b=3), add_special_tokens=False)) + 1
    script = Script(tok, [call_text("add", a=2, b=3), "5"])
    [[ep]] = run_episodes(script, tok, env, env.tasks("train"), sampling(tok), limits(tokens=turn1 + 10))
    # the observation does not fit: the episode ends before turn 2
    assert ep.turns == 1 and ep.verdict.info["episode_end"] == "token_limit" and len(ep.token_ids) <= turn1 + 10
    [[cut]] = run_episodes(Script(tok, [call_text("add", a=2, b=3)]), tok, env, env.tasks("train"), sampling(tok), limits(tokens=12))
    assert len(cut.token_ids) == len(cut.logprobs) == 12 and cut.finish_reason == "length"
    assert cut.verdict.info["episode_end"] == "token_limit" and "middle of a tool call" in cut.verdict.feedback
    assert script.calls[0][1].max_new_tokens == turn1 + 10  # the engine is never asked for more than the budget


def test_a_tool_that_raises_or_hangs_ends_the_episode_with_reward_0_and_feedback(tok):
    env = Adder()
    [[ep]] = run_episodes(Script(tok, [call_text("add", a="boom", b=1), "5"]), tok, env, env.tasks("train"), sampling(tok), limits())
    assert ep.verdict.reward == 0.0 and ep.verdict.info["episode_end"] == "tool_error"
    assert "RuntimeError: boom" in ep.verdict.feedback and ep.turns == 1
    slow = Adder(hang_s=3.0)
    [[hung]] = run_episodes(Script(tok, [call_text("add", a=2, b=3), "5"]), tok, slow, slow.tasks("train"), sampling(tok),
                            limits(timeout=0.2))
    assert hung.verdict.reward == 0.0 and hung.verdict.info["episode_end"] == "tool_timeout" and "0.2 s" in hung.verdict.feedback


def test_a_final_answer_whose_verify_raises_has_no_verdict(tok):
    class Broken(Adder):
        def verify(self, task, completion):
            raise ValueError("bad key")

    env = Broken()
    groups = run_episodes(Script(tok, None, per_episode=[["5"], ["7"]]), tok, env, env.tasks("train"), sampling(tok, n=2), limits())
    [ep, _] = groups[0]
    assert ep.verdict.reward == 0.0 and ep.verdict.info["verifier_failure"] == "error" and "bad key" in ep.verdict.info["verifier_error"]
    samples, stats = batch_of(tok, env, groups)
    assert [s.sd_mask for s in samples] == [0, 0] and stats["teacher/no_verdict_frac"] == 1.0


def test_a_malformed_call_is_answered_without_the_tool(tok):
    env = Adder()
    [[ep]] = run_episodes(Script(tok, ["<tool_call>\n{oops}\n</tool_call>", "5"]), tok, env, env.tasks("train"), sampling(tok), limits())
    assert env.steps == 0 and ep.verdict.reward == 1.0
    assert ep.messages[1]["role"] == "tool" and "invalid tool call" in ep.messages[1]["content"]


def test_observation_ids_refuse_a_template_that_does_not_continue(tok):
    odd = build_tokenizer()
    odd.chat_template = "{{- 'X' -}}{%- for m in messages -%}{{- m['content'] -}}{%- endfor -%}"
    with pytest.raises(ValueError, match="re-tokenizing"):
        observation_ids(odd, [{"role": "tool", "content": "5"}], None, {odd.eos_token_id})


# ---------------------------------------------------------------- teacher contexts on episodes (SPEC 2a)

def episodes_of(tok, scripts, n):
    env = Adder()
    return env, run_episodes(Script(tok, None, per_episode=scripts), tok, env, env.tasks("train"), sampling(tok, n=n), limits())


def batch_of(tok, env, groups, **cfg):
    cfg = TeacherContextConfig(**cfg)
    verdicts = [[e.verdict for e in g] for g in groups]
    return build_batch(env.tasks("train"), [g[0].prompt_ids for g in groups], groups, verdicts, tok, cfg, tools=env.tools)


def teacher_text(tok, sample):
    return tok.decode(sample.teacher_prompt_ids, skip_special_tokens=False)


def test_teacher_sees_a_successful_siblings_episode_with_self_exclusion(tok):
    scripts = [["7"], [call_text("add", a=2, b=3), "5"], ["5"]]  # fail, success (2 turns), success (1 turn)
    env, groups = episodes_of(tok, scripts, 3)
    samples, stats = batch_of(tok, env, groups)
    transcript = demonstration_text(groups[0][1], "episode")
    assert transcript == "[assistant]\n" + call_text("add", a=2, b=3) + "\n\n[tool add]\n5\n\n[assistant]\n5"
    assert transcript in teacher_text(tok, samples[0])  # the failure: the first success's whole episode
    assert "Correct solution:\n\n[assistant]\n5\n\nCorrectly" in teacher_text(tok, samples[1])  # self excluded: the next one
    assert transcript in teacher_text(tok, samples[2])
    for s, e in zip(samples, groups[0]):
        assert s.response_ids == e.token_ids and s.loss_mask == e.loss_mask and s.sd_mask == 1
        assert len(s.rollout_logprobs) == sum(s.loss_mask)  # log-probs of the model's tokens only
        assert teacher_text(tok, s).startswith("<|im_start|>system\n<tools>add</tools>")  # the same tools
        assert teacher_text(tok, s).endswith("<|im_start|>assistant\n")
    assert stats["teacher/with_solution_frac"] == 1.0


def test_final_answer_demonstrations_and_feedback_only_without_solution(tok):
    scripts = [["7"], [call_text("add", a=2, b=3), "5"]]
    env, groups = episodes_of(tok, scripts, 2)
    samples, _ = batch_of(tok, env, groups, episode_demonstration="final_answer")
    assert "Correct solution:\n\n5\n\nCorrectly" in teacher_text(tok, samples[0])
    assert "[tool" not in teacher_text(tok, samples[0]) and "expected 5" not in teacher_text(tok, samples[0])
    assert samples[1].sd_mask == 0  # a lone success gets nothing
    # no success in the group: each episode gets its own feedback, including the framework's
    env = Adder()
    groups = run_episodes(Script(tok, None, per_episode=[["7"], [call_text("add", a=1, b=1)]]), tok, env,
                          env.tasks("train"), sampling(tok, n=2), limits(turns=1))
    samples, stats = batch_of(tok, env, groups)
    assert "expected 5" in teacher_text(tok, samples[0])
    assert "limit of 1 turns" in teacher_text(tok, samples[1])
    assert stats["teacher/with_feedback_frac"] == 1.0 and stats["teacher/with_solution_frac"] == 0.0
    samples, _ = batch_of(tok, env, groups, include_environment_feedback=False)
    assert [s.sd_mask for s in samples] == [0, 0]


def test_turns_demonstrations_are_the_siblings_episode_as_earlier_turns(tok):
    scripts = [["7"], [call_text("add", a=2, b=3), "5"], ["5"]]  # fail, success (2 turns), success (1 turn)
    env, groups = episodes_of(tok, scripts, 3)
    samples, _ = batch_of(tok, env, groups, episode_demonstration="turns")
    question = env.tasks("train")[0].messages
    again = {"role": "user", "content": "2+3?\n\nCorrectly solve the original question."}
    first = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add",
              "arguments": {"a": 2, "b": 3}}}]}, {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5"}]
    assert samples[0].teacher_prompt_ids == chat_ids(tok, [*question, *first, again], tools=env.tools)
    assert samples[2].teacher_prompt_ids == samples[0].teacher_prompt_ids  # shown the same sibling
    # self excluded: the second success is shown the third's one-turn episode
    assert samples[1].teacher_prompt_ids == chat_ids(tok, [*question, {"role": "assistant", "content": "5"}, again], tools=env.tools)
    # the template renders the sibling's turns as the very ids it sampled, observations included
    demo, prompt = groups[0][1].token_ids, samples[0].teacher_prompt_ids
    assert any(prompt[i:i + len(demo)] == demo for i in range(len(prompt))), "the demonstration is not the sibling's own ids"
    # no success in the group: the feedback goes into the reprompt as in the other forms
    env = Adder()
    groups = run_episodes(Script(tok, None, per_episode=[["7"], ["8"]]), tok, env, env.tasks("train"), sampling(tok, n=2), limits())
    samples, _ = batch_of(tok, env, groups, episode_demonstration="turns")
    assert "expected 5" in teacher_text(tok, samples[0]) and teacher_text(tok, samples[0]).count("<|im_start|>user") == 1


# ---------------------------------------------------------------- the built-in tool task and the README's example

def test_calculator_task_through_an_episode_and_the_warm_starts_call_format(tok):
    import json

    from environments.calculator import Calculator
    from models.tiny_calculator import TEACHER_CONTEXT, _episode, demonstration_episode, teacher_prompt
    from models.tiny_calculator import call_text as warm_call
    from sdpo.recipe import load_config

    env = Calculator(limit_per_split=2)
    task = env.tasks("test")[0]
    numbers = json.loads(task.messages[0]["content"])  # the question states the call's arguments
    a, b = numbers["a"], numbers["b"]
    # the warm start writes calls exactly as the chat template renders them
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]}], tokenize=False)
    assert "<|im_start|>assistant\n" + warm_call(a, b) + "<|im_end|>" in rendered
    [[ep]] = run_episodes(Script(tok, [warm_call(a, b), str(a + b)]), tok, env, [task], sampling(tok), limits())
    assert ep.verdict.reward == 1.0
    ids, mask = _episode(tok, a, b)  # what the warm start trains on is what an episode holds
    assert (ids, mask) == (ep.token_ids, ep.loss_mask)
    # and its teacher phase trains on the teacher prompt the recipe's run builds from a real episode
    recipe = load_config("recipes/tools_cpu.yaml", []).teacher_context
    assert all(getattr(recipe, k) == v for k, v in TEACHER_CONTEXT.model_dump().items() if k in TEACHER_CONTEXT.model_fields_set)
    assert demonstration_turns(ep) == demonstration_turns(demonstration_episode(a, b))
    [[failed]] = run_episodes(Script(tok, ["12"]), tok, env, [task], sampling(tok), limits())
    samples, _ = build_batch([task], [ep.prompt_ids], [[failed, ep]], [[failed.verdict, ep.verdict]], tok, recipe, tools=env.tools)
    assert samples[0].teacher_prompt_ids == teacher_prompt(tok, a, b)
    [[wrong]] = run_episodes(Script(tok, ["12"]), tok, env, [task], sampling(tok), limits())
    assert wrong.verdict.reward == 0.0 and "add tool" in wrong.verdict.feedback
    [[broken]] = run_episodes(Script(tok, ['<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>']), tok, env,
                              [task], sampling(tok), limits())
    assert broken.verdict.info["episode_end"] == "tool_error" and "KeyError" in broken.verdict.feedback


def test_the_readme_multi_turn_example_runs_and_is_short(tok):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```python\n")[1:] if "MultiTurnEnvironment" in b).split("```")[0]
    assert len(block.strip().splitlines()) < 30
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    env = scope["Calculator"]()
    [[ep]] = run_episodes(Script(tok, [call_text("add", a=4821, b=9377), "14198"]), tok, env, env.tasks("train"),
                          sampling(tok), limits())
    assert ep.verdict.reward == 1.0 and ep.messages[1]["content"] == "14198"


def test_a_qwen3_style_template_splices_observations_after_the_turn(tok):
    """A Qwen3-based template (shipped with vLLM) renders the last assistant message with an empty
    think block that goes once tool messages follow: the observation is still the rendering after
    the assistant's end-of-turn, through the next assistant header."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")  # its location only: importing vLLM is slow
    root = Path(spec.submodule_search_locations[0] if spec else "/nonexistent")
    path = root / "transformers_utils" / "chat_templates" / "template_minicpmv45.jinja"
    if not path.is_file():
        pytest.skip("vLLM's bundled Qwen3-style template is not there")
    qwen3 = build_tokenizer()
    qwen3.chat_template = path.read_text()
    fmt = ToolCallFormat.from_tokenizer(qwen3)
    assert (fmt.opening, fmt.closing) == ("<tool_call>", "</tool_call>")
    obs = observation_ids(qwen3, [{"role": "tool", "name": "add", "content": "5"}], Adder.tools, {qwen3.eos_token_id})
    assert qwen3.decode(obs) == ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                                 "<|im_start|>assistant\n<think>\n\n</think>\n\n")
