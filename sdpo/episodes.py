"""Multi-turn episodes in the rollout path: the model acts, a tool answers, until it answers for good.

Driver-side, on token ids. Each round, every unfinished episode's ids so far (prompt, then its
turns and observations) go to the engines through the same ``generate`` the single-turn path uses;
a turn ends where the model ends it (a stop token). The turn's text is parsed for tool calls in the
chat template's own format (sdpo/tool_calls.py), the environment's ``step`` answers, and the
observation's ids are appended. Nothing the model produced is ever re-tokenized: an observation's
ids are the chat template's rendering of the tool messages (and the next assistant header) after
an assistant turn's end-of-turn token, cut out of a short reference chat (``observation_ids``).

An episode is one training sample (SPEC 2a): ``token_ids`` is the whole response, ``loss_mask`` is
1 on model tokens and 0 on observation tokens, ``logprobs`` has one entry per model token.

Environment steps run in the verifier actors (sdpo/episode_steps.py, through the trainer's EnvPool),
all unfinished episodes' steps of a round at once (an environment's ``step`` must tolerate that),
``environment.tool_timeout_s`` each: a tool that raises or runs past it ends its episode with reward 0
and feedback; a final answer whose verification raises or hangs gets no verdict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from environments import EpisodeState, Task, Verdict
from sdpo.chat import chat_ids
from sdpo.episode_steps import LocalSteps, ended
from sdpo.rollout.base import Completion, Sampling
from sdpo.tool_calls import ToolCallFormat

_ROUND_SEED_STRIDE = 1_000_033  # round r samples with seed + r * stride: rounds never share streams


@dataclasses.dataclass
class Episode:
    """One sampled episode; reads like a ``Completion`` (token_ids, logprobs, finish_reason,
    policy_version) so the rest of the step treats it as one sample."""

    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)  # model and observation tokens
    loss_mask: list[int] = dataclasses.field(default_factory=list)  # 1: model token, 0: observation
    logprobs: list[float] = dataclasses.field(default_factory=list)  # one per model token
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # assistant and tool messages
    verdict: Verdict | None = None
    turns: int = 0
    finish_reason: str = "stop"
    policy_version: int = -1

    def add_turn(self, completion: Completion, ids: list[int], message: dict[str, Any]) -> None:
        self.token_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += completion.logprobs[: len(ids)]
        self.messages.append(message)
        self.turns += 1
        self.finish_reason = "length" if len(ids) < len(completion.token_ids) else completion.finish_reason
        # the oldest weights that sampled any turn: what the policy-version lag should report
        version = completion.policy_version
        self.policy_version = version if self.policy_version < 0 else min(self.policy_version, version)

    def add_observation(self, ids: list[int], messages: list[dict[str, Any]]) -> None:
        self.token_ids += ids
        self.loss_mask += [0] * len(ids)
        self.messages += messages


@dataclasses.dataclass
class EpisodeLimits:
    max_turns: int
    max_tokens: int  # model and observation tokens of the response
    tool_timeout_s: float
    max_context_tokens: int | None = None  # the engines' context, when known


def run_episodes(generate: Callable[[list[list[int]], Sampling], list[list[Completion]]], tokenizer: Any, env: Any,
                 tasks: list[Task], sampling: Sampling, limits: EpisodeLimits,
                 prompt_ids: list[list[int]] | None = None, steps: Any = None) -> list[list[Episode]]:
    """``sampling.n`` episodes per task; returns them grouped per task, each with its final Verdict.
    ``prompt_ids``: the prompts to start from (default: each task's chat with the tools; the
    teacher probe passes teacher prompts). ``steps``: where ``env``'s start and step run (the
    trainer's verifier pool; default: threads of this process, ``LocalSteps``)."""
    steps = steps or LocalSteps(env)
    tools = list(getattr(env, "tools", None) or []) or None
    fmt = ToolCallFormat.from_tokenizer(tokenizer) if tools else None
    stops = set(sampling.stop_token_ids or []) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    prompts = prompt_ids or [chat_ids(tokenizer, t.messages, tools=tools) for t in tasks]
    groups = [[Episode(p) for _ in range(sampling.n)] for p in prompts]
    everyone = [ep for g in groups for ep in g]
    key = {id(ep): i for i, ep in enumerate(everyone)}  # an episode's steps all go to one verifier process
    states: dict[int, Any] = {}
    started = steps.start_episodes([task for task in tasks for _ in range(sampling.n)], list(range(len(everyone))))
    for ep, state in zip(everyone, started):
        if isinstance(state, Verdict):
            ep.verdict = state
        else:
            states[key[id(ep)]] = state
    active, rnd = [ep for ep in everyone if ep.verdict is None], 0
    while active:
        budget = max(limits.max_tokens - len(ep.token_ids) for ep in active)
        if limits.max_context_tokens:  # no context may run past the engines' positions
            budget = min(budget, limits.max_context_tokens - max(len(ep.prompt_ids) + len(ep.token_ids) for ep in active))
        if budget <= 0:
            for ep in active:
                ep.verdict = ended(_out_of_tokens(limits), "token_limit")
            break
        if rnd == 0:  # n samples of each prompt in one call, as the single-turn path draws them
            drawn = [c for g in generate(prompts, dataclasses.replace(sampling, max_new_tokens=budget)) for c in g]
            turns = [c for ep, c in zip(everyone, drawn) if ep.verdict is None]
        else:
            seed = None if sampling.seed is None else sampling.seed + rnd * _ROUND_SEED_STRIDE
            contexts = [ep.prompt_ids + ep.token_ids for ep in active]
            turns = [g[0] for g in generate(contexts, dataclasses.replace(sampling, n=1, max_new_tokens=budget, seed=seed))]
        rnd += 1
        to_step, still = [], []
        for ep, completion in zip(active, turns):
            ids = completion.token_ids[: max(0, limits.max_tokens - len(ep.token_ids))]
            turn_ended = bool(ids) and ids[-1] in stops
            text = tokenizer.decode(ids[:-1] if turn_ended else ids, skip_special_tokens=False)
            message = fmt.parse(text) if fmt else {"role": "assistant", "content": text}
            message["raw"] = text
            ep.add_turn(completion, ids, message)
            state = states[key[id(ep)]]
            if isinstance(state, EpisodeState):
                state.turn = ep.turns
            if message.get("tool_calls") and not turn_ended:
                ep.verdict = ended(_out_of_tokens(limits, "in the middle of a tool call"), "token_limit")
            elif message.get("tool_calls") and ep.turns >= limits.max_turns:
                ep.verdict = ended(f"the episode reached its limit of {limits.max_turns} turns without a final answer",
                                    "turn_limit")
            else:  # a final answer (verified like a single-turn completion), or tool calls to run
                to_step.append((ep, state, message))
        results = steps.step_episodes([(state, _public(m)) for _, state, m in to_step], [key[id(ep)] for ep, _, _ in to_step],
                                      limits.tool_timeout_s)
        for (ep, _, _), (result, state) in zip(to_step, results):
            states[key[id(ep)]] = state  # stepped in another process: the state comes back with the result
            if isinstance(result, Verdict):
                ep.verdict = result
                continue
            # the template's end of an assistant turn is the tokenizer's EOS (<|im_end|> for ChatML), whatever
            # else the sampling stops at
            obs = observation_ids(tokenizer, result, tools, {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else stops)
            if len(ep.token_ids) + len(obs) >= limits.max_tokens:
                ep.verdict = ended(_out_of_tokens(limits), "token_limit")
            else:
                ep.add_observation(obs, result)
                still.append(ep)
        active = still
    return groups


def _out_of_tokens(limits: EpisodeLimits, where: str = "") -> str:
    return f"the episode ran out of its budget of {limits.max_tokens} tokens {where + ' ' if where else ''}before a final answer"


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "raw"}


def observation_ids(tokenizer: Any, tool_messages: list[dict[str, Any]], tools: list | None, stops: set[int]) -> list[int]:
    """The ids that follow an assistant turn's end-of-turn token when ``tool_messages`` answer it,
    through the next assistant header: the chat template's own rendering of a reference chat (user,
    assistant, then the tool messages), cut right after the assistant's end-of-turn token. Found by
    count, not by comparing prefixes: templates such as Qwen3's render the assistant message itself
    differently once tool messages follow it (its empty think block goes), which does not matter here,
    since the model's own tokens stand in its place."""
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    turn_ends = sum(t in stops for t in chat_ids(tokenizer, base, add_generation_prompt=False, tools=tools))
    after = chat_ids(tokenizer, base + tool_messages, add_generation_prompt=True, tools=tools)
    ends = [i for i, t in enumerate(after) if t in stops]
    if not turn_ends or len(ends) < turn_ends:
        raise ValueError("the chat template does not end an assistant turn with the tokenizer's EOS, then render tool "
                         "messages after it: observation tokens cannot be appended without re-tokenizing")
    return after[ends[turn_ends - 1] + 1:]


def demonstration_text(episode: Episode, mode: str) -> str:
    """What a successful episode shows the teacher (SPEC 2a): the transcript, or the final answer.
    Thinking is removed by the teacher context builder (``remove_thinking_from_demonstration``)."""
    assistant = [m for m in episode.messages if m.get("role") == "assistant"]
    if mode == "final_answer":
        return assistant[-1]["content"] if assistant else ""
    blocks = []
    for m in episode.messages:
        if m.get("role") == "assistant":
            blocks.append("[assistant]\n" + m.get("raw", m.get("content", "")))
        else:
            blocks.append(f"[tool {m.get('name', '')}]".replace(" ]", "]") + "\n" + m["content"])
    return "\n\n".join(blocks)


def demonstration_turns(episode: Episode) -> list[dict[str, Any]]:
    """A successful episode as chat messages, for ``episode_demonstration: turns`` (SPEC 2a): its
    assistant turns with their tool calls in the chat template's own form, and its tool messages.
    A turn whose call could not be parsed keeps the model's text as its content."""
    out: list[dict[str, Any]] = []
    for m in episode.messages:
        if m.get("role") != "assistant":
            out.append({k: v for k, v in m.items() if k in ("role", "name", "content")})
        elif any(c.get("error") for c in m.get("tool_calls", [])):
            out.append({"role": "assistant", "content": m.get("raw", m.get("content", ""))})
        else:
            calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m.get("tool_calls", [])]
            out.append({"role": "assistant", "content": m.get("content", ""), **({"tool_calls": calls} if calls else {})})
    return out
