"""Rollouts for online RL, shared by `orchard grpo` and `orchard ppo`.

Prompts (files of prompt-only records with optional reference answers, GSM8K, or the built-in
world's questions) are rendered once with the chat template. A rollout samples replies from the
policy with orchard's batched KV-cache sampler, scores them with the rewards, and lays them out
for a training forward pass:

    input_ids   [pad pad p p p p | c c c c <end> pad]
                 left-padded prompt  right-padded completion
    completion_mask                 [1 1 1 1 1     0]

so the logits at columns P-1 .. P+C-2 predict the completion (P prompt columns, C completion ones),
and the per-token tensors of `orchard.losses.rl` are the completion columns alone.

With an environment (`environment=calculator,lookup`, `orchard.environments`) a completion is a
whole episode: the model's replies and, between them, the tool results it read, which are in
input_ids and completion_ids but out of completion_mask, so no loss covers them. The reward of an
episode is the rewards' value on its final answer, 0 when a tool call failed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.packing import EpochOrder, micro_batch_samples
from ..environments import Episode, environment_factory, run_episodes
from ..errors import OrchardError
from ..losses.tokens import IGNORE_INDEX
from ..model.generation import SamplingConfig, generate
from ..peft.config import ReferenceModel, apply_peft
from ..rewards import Rewards
from ..training import TrainConfig, TrainResult
from ..training.launch import MethodConfig, Start, finish, start_from
from ..training.runtime import Runtime
from .prompts import Prompt, PromptDataConfig, load_prompts


@dataclass
class OnlineConfig(MethodConfig):
    """The recipe fields of the methods that sample their own replies and learn from their rewards."""

    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Weighted rewards, each [WEIGHT*]SOURCE: a built-in (exact_match, numeric_match, answer_format,
    single_line, length_penalty), module:function, model:PATH (a reward model) or judge:PATH."""
    max_new_tokens: int = 64
    """Longest reply sampled (each turn's, with an environment)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    compile_decoding: bool = False
    """Sample with a static KV cache and a compiled decoding step (`SamplingConfig.compile`): in bf16
    on the CPU ~20% faster rollouts (16 replies of 64 tokens, a 3.4M model: 0.24 -> 0.19 s) after a
    first rollout that compiles (~10 s), so for runs of more than ~100 steps."""
    num_iterations: int = 1
    """Optimizer steps per rollout (GRPO's mu, PPO's epochs): above 1, later steps reuse the replies
    and the clipped ratio bounds how far the policy moves from the one that sampled them.
    train.save_every must be a multiple of it, so a resumed run starts at a fresh rollout."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-5, warmup_steps=5,
                                                                   weight_decay=0.0, batch_size=4, eval_every=25,
                                                                   save_every=25, log_every=1))

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")
        if self.train.save_every % self.num_iterations:
            raise ValueError(f"train.save_every ({self.train.save_every}) must be a multiple of num_iterations "
                             f"({self.num_iterations})")


def turn_end_ids(tokenizer) -> list[int]:
    """Tokens that end a reply: end of text, and the chat template's end of turn."""
    ids = [tokenizer.eos_id]
    for token in ("<|im_end|>", "<|eot_id|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids.append(token_id)
    return ids


@dataclass
class Sampled:
    """Replies (or episodes) to prompts, scored: one row per reply."""

    prompts: list[Prompt]
    completions: list[list[int]]
    generated: list[list[bool]] | None
    """Per completion token, whether the model wrote it (None: all of them, no environment)."""
    total: torch.Tensor
    valid: torch.Tensor
    by_reward: dict[str, list[float | None]]
    tool_failed: list[bool] | None = None
    tool_calls: list[int] | None = None

    def rows(self, keep: list[int]) -> "Sampled":
        """These rows alone, in the order `keep` gives."""
        lists = {name: None if getattr(self, name) is None else [getattr(self, name)[i] for i in keep]
                 for name in _ROW_LISTS}
        return Sampled(**lists, total=self.total[keep], valid=self.valid[keep],
                       by_reward={name: [values[i] for i in keep] for name, values in self.by_reward.items()})

    @staticmethod
    def joined(parts: list["Sampled"]) -> "Sampled":
        """The rows of `parts`, one after the other."""
        lists = {name: None if getattr(parts[0], name) is None else [x for p in parts for x in getattr(p, name)]
                 for name in _ROW_LISTS}
        return Sampled(**lists, total=torch.cat([p.total for p in parts]), valid=torch.cat([p.valid for p in parts]),
                       by_reward={name: [x for p in parts for x in p.by_reward[name]] for name in parts[0].by_reward})


_ROW_LISTS = ("prompts", "completions", "generated", "tool_failed", "tool_calls")


class Rollouts:
    """Samples, scores and lays out replies to the training prompts: a pure function of
    (step, micro-batch, rank) and the policy's weights, so a resumed run samples what the
    uninterrupted one would have."""

    def __init__(self, policy, tokenizer, prompts: list[Prompt], rewards: Rewards, sampling: SamplingConfig,
                 num_generations: int, batch_size: int, grad_accum: int, seed: int, runtime: Runtime,
                 num_iterations: int = 1, environment=None, max_length: int | None = None,
                 dynamic_sampling: int = 0):
        self.policy, self.tokenizer, self.prompts, self.rewards = policy, tokenizer, prompts, rewards
        self.sampling, self.num_generations = sampling, num_generations
        self.batch_size, self.grad_accum, self.seed, self.runtime = batch_size, grad_accum, seed, runtime
        self.num_iterations = num_iterations
        self.environment, self.max_length, self.dynamic_sampling = environment, max_length, dynamic_sampling
        self.order = EpochOrder(len(prompts), seed)
        self.end_ids = turn_end_ids(tokenizer)
        self._prepared: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def reused(self, step: int, micro: int, rank: int, world: int, prepare) -> dict[str, torch.Tensor]:
        """The micro-batch of rollout step // num_iterations, sampled and `prepare`d (advantages,
        old log-probabilities, ...) on its first step and reused for the next num_iterations - 1
        optimizer steps (GRPO's mu, PPO's epochs), where the clipped ratio starts to matter."""
        key = (step // self.num_iterations, micro, rank)
        if key not in self._prepared:
            self._prepared = {k: v for k, v in self._prepared.items() if k[0] == key[0]}
            self._prepared[key] = prepare(self.batch(key[0], micro, rank, world))
        return self._prepared[key]

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
               row_seeds: list[int] | None = None) -> list[list[int]]:
        """Replies to `prompt_ids`; a sharded policy's weights are gathered once for the whole of it,
        so each process samples replies of its own lengths without waiting for the others."""
        was_training = self.policy.training
        self.policy.eval()
        with self.runtime.distributed.gathered(self.policy), self.runtime.autocast():
            completions = generate(self.policy, prompt_ids, sampling, self.end_ids, self.tokenizer.pad_id,
                                   keep_end_token=True, row_seeds=row_seeds)
        self.policy.train(was_training)
        return completions

    def texts(self, completions: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode([t for t in c if t not in self.end_ids]) for c in completions]

    def complete(self, prompts: list[Prompt], sampling: SamplingConfig, row_seeds: list[int] | None = None) -> Sampled:
        """Each prompt's reply (with an environment: its episode), scored by the rewards."""
        messages, answers = [p.messages for p in prompts], [p.answer for p in prompts]
        # A prompt column goes to the rewards only when the prompts have it (as a dataset's in TRL).
        columns = {"rivals": [p.rivals for p in prompts]} if any(p.rivals is not None for p in prompts) else {}
        if self.environment is None:
            completions = self.sample([p.ids for p in prompts], sampling, row_seeds)
            scored = self.rewards(messages, self.texts(completions), answers, **columns)
            return Sampled(prompts, completions, None, scored.total, scored.valid, scored.by_reward)

        def sample(contexts: list[list[int]], rows: list[int], turn: int) -> list[list[int]]:
            seeds = None if row_seeds is None else [row_seeds[r] + 7919 * turn for r in rows]
            return self.sample(contexts, sampling, seeds)

        episodes: list[Episode] = run_episodes(sample, self.tokenizer, [self.environment() for _ in prompts],
                                               messages, [p.ids for p in prompts], self.end_ids, self.max_length)
        scored = self.rewards(messages, [e.final for e in episodes], answers, tool_calls=[e.calls for e in episodes],
                              **columns)
        failed = [e.failure is not None for e in episodes]
        for i in (i for i, f in enumerate(failed) if f):  # a failed tool call fails the episode
            scored.total[i] = 0.0
            for values in scored.by_reward.values():
                values[i] = 0.0 if values[i] is not None else None
        return Sampled(prompts, [e.completion for e in episodes], [e.generated for e in episodes], scored.total,
                       scored.valid, scored.by_reward, failed, [e.calls for e in episodes])

    def _groups(self, prompt_indices: list[int], seed_of) -> Sampled:
        prompts = [self.prompts[i] for i in prompt_indices for _ in range(self.num_generations)]
        seeds = [seed_of(n, g) for n in range(len(prompt_indices)) for g in range(self.num_generations)]
        return self.complete(prompts, self.sampling, seeds)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        samples = micro_batch_samples(step, micro, rank, world, self.batch_size, self.grad_accum)
        # Each reply's sampler is seeded by its place in the run (sample number, generation), so the
        # replies are the same however the global batch is split over processes and micro-batches.
        sampled = self._groups([self.order[s] for s in samples],
                               lambda n, g: self.seed * 1_000_003 + samples[n] * 1009 + g)
        rounds = 0
        if self.dynamic_sampling:
            sampled, rounds = self._refilled(sampled, step, micro, rank)
        batch = layout([p.ids for p in sampled.prompts], sampled.completions, self.tokenizer.pad_id,
                       sampled.generated)
        batch["rewards"] = sampled.total
        batch["reward_valid"] = sampled.valid
        batch["rewards_by_function"] = torch.tensor(
            [[float("nan") if v is None else v for v in sampled.by_reward[name]] for name in self.rewards.names]).T
        if self.dynamic_sampling:
            batch["resample_rounds"] = torch.tensor(float(rounds))
        if sampled.tool_failed is not None:
            batch["tool_failed"] = torch.tensor(sampled.tool_failed, dtype=torch.float)
            batch["tool_calls"] = torch.tensor(sampled.tool_calls, dtype=torch.float)
        return batch

    def _refilled(self, sampled: Sampled, step: int, micro: int, rank: int) -> tuple[Sampled, int]:
        """DAPO's dynamic sampling: groups whose rewards are all equal (no advantage, no gradient)
        are dropped and replaced by groups of other prompts, drawn at random (seeded by the place
        in the run), for up to `dynamic_sampling` rounds; what is still missing then is made up
        with dropped groups, so every micro-batch keeps its size. Returns the rounds used."""
        G, wanted = self.num_generations, len(sampled.prompts) // self.num_generations
        kept, dropped = self._split_groups(sampled)
        rng = random.Random(f"dynamic-sampling:{self.seed}:{step}:{micro}:{rank}")
        rounds = 0
        while sum(len(k.prompts) for k in kept) < wanted * G and rounds < self.dynamic_sampling:
            rounds += 1
            missing = wanted - sum(len(k.prompts) for k in kept) // G
            picks = [rng.randrange(len(self.prompts)) for _ in range(missing)]
            fresh = self._groups(picks, lambda n, g: self.seed * 1_000_003 + 1_000_000_007 * rounds + picks[n] * 1009 + g)
            more, less = self._split_groups(fresh)
            kept, dropped = kept + more, dropped + less
        rows = Sampled.joined(kept + dropped) if kept or dropped else sampled
        return rows.rows(list(range(wanted * G))), rounds

    def _split_groups(self, sampled: Sampled) -> tuple[list[Sampled], list[Sampled]]:
        """(groups whose valid rewards differ, the others), each group a `Sampled` of G rows."""
        varied, equal = [], []
        G = self.num_generations
        for start in range(0, len(sampled.prompts), G):
            group = sampled.rows(list(range(start, start + G)))
            rewards = group.total[group.valid]
            (varied if len(rewards) > 1 and rewards.max() > rewards.min() else equal).append(group)
        return varied, equal

    @torch.no_grad()
    def evaluate(self, prompts: list[Prompt], batch_size: int = 32, samples: int = 0) -> dict[str, float]:
        """Greedy replies to `prompts`, scored: each reward's mean over the samples it scored, the
        weighted total's mean over valid samples, and the failures; with `samples` = k, also k
        replies per prompt at the training temperature (seeded by their place, the same at every
        evaluation): each reward's mean@k and pass@k (its best of the k, averaged over prompts).
        With an environment, also the share of episodes whose tool calls failed and the calls
        per episode."""
        greedy = SamplingConfig(**{**vars(self.sampling), "temperature": 0.0, "seed": None})
        values: dict[str, list[float]] = {name: [] for name in self.rewards.names}
        totals, failures, lengths, tool_failed, tool_calls = [], 0, [], [], []
        for start in range(0, len(prompts), batch_size):
            sampled = self.complete(prompts[start:start + batch_size], greedy)
            for name in self.rewards.names:
                values[name] += [v for v in sampled.by_reward[name] if v is not None]
            totals += sampled.total[sampled.valid].tolist()
            failures += int((~sampled.valid).sum())
            lengths += [len(c) for c in sampled.completions]
            tool_failed += sampled.tool_failed or []
            tool_calls += sampled.tool_calls or []
        metrics = {"val_reward": sum(totals) / max(len(totals), 1),
                   "val_completion_length": sum(lengths) / max(len(lengths), 1),
                   "val_reward_failures": float(failures)}
        if self.environment is not None:
            metrics["val_tool_failures"] = sum(tool_failed) / max(len(tool_failed), 1)
            metrics["val_tool_calls"] = sum(tool_calls) / max(len(tool_calls), 1)
        for name, found in values.items():
            metrics[f"val_reward/{name}"] = sum(found) / max(len(found), 1)
        if samples:
            metrics.update(self._sampled(prompts, samples, max(1, batch_size // samples)))
        return metrics

    def evaluation(self, val: list[Prompt], data: PromptDataConfig) -> dict[str, float]:
        """`evaluate` on the held-out prompts and on the first `data.eval_trained_prompts` training
        prompts, whose metrics are named trained_* instead of val_*."""
        metrics = self.evaluate(val, samples=data.eval_samples)
        if data.eval_trained_prompts:
            trained = self.evaluate(self.prompts[:data.eval_trained_prompts], samples=data.eval_samples)
            metrics.update({f"trained_{key.removeprefix('val_')}": value for key, value in trained.items()})
        return metrics

    def _sampled(self, prompts: list[Prompt], k: int, prompts_per_batch: int) -> dict[str, float]:
        scores: dict[str, list[list[float]]] = {name: [] for name in self.rewards.names}
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[start:start + prompts_per_batch]
            repeated = [p for p in chunk for _ in range(k)]
            seeds = [1_000_033 * (start + i) + j for i in range(len(chunk)) for j in range(k)]
            sampled = self.complete(repeated, self.sampling, seeds)
            for name in self.rewards.names:
                column = sampled.by_reward[name]
                scores[name] += [[v for v in column[i * k:(i + 1) * k] if v is not None] for i in range(len(chunk))]
        metrics = {}
        for name, per_prompt in scores.items():
            scored_prompts = [s for s in per_prompt if s]
            metrics[f"val_mean@{k}/{name}"] = sum(sum(s) / len(s) for s in scored_prompts) / max(len(scored_prompts), 1)
            metrics[f"val_pass@{k}/{name}"] = sum(max(s) for s in scored_prompts) / max(len(scored_prompts), 1)
        return metrics


def layout(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
           generated: list[list[bool]] | None = None) -> dict[str, torch.Tensor]:
    """The training layout of the module docstring: input_ids and attention_mask (N, P + C),
    completion_ids (N, C) with IGNORE_INDEX on padding, completion_mask (N, C): the completion's
    tokens, less those `generated` marks False (tool results)."""
    n = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + C), dtype=torch.long)
    completion_ids = torch.full((n, C), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        input_ids[row, P - len(prompt):P] = torch.tensor(prompt)
        attention_mask[row, P - len(prompt):P + len(completion)] = 1
        if completion:
            input_ids[row, P:P + len(completion)] = torch.tensor(completion)
            completion_ids[row, :len(completion)] = torch.tensor(completion)
    completion_mask = completion_ids != IGNORE_INDEX
    for row, marks in enumerate(generated or []):
        completion_mask[row, :len(marks)] &= torch.tensor(marks, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


@dataclass
class OnlineRun:
    """What GRPO and PPO build alike before their method: the start (runtime and policy, adapters
    attached), its rollouts, held-out prompts, the reference, and the lineage facts."""

    start: Start
    rollouts: Rollouts
    val: list[Prompt]
    reference: ReferenceModel | None
    stage: str
    data_record: dict
    parameters: tuple[int, int]


def prepare_online_run(config: OnlineConfig, stage: str, num_generations: int, keep_reference: bool,
                       value_head: bool = False, environment: str | None = None, max_turns: int = 3,
                       tool_listing: str = "template", dynamic_sampling: int = 0) -> OnlineRun:
    """Load `config.init` (merged), its rewards and prompts, keep a reference if asked (before any
    adapter is attached), attach `config.peft` and, for PPO, a value head. With `environment`,
    completions are episodes with its tools (`orchard.environments.environment_factory`)."""
    make_environment = environment_factory(environment, max_turns, tool_listing) if environment else None
    start = start_from(config.init, stage, config.train)
    model, tokenizer, runtime = start.model, start.tokenizer, start.runtime
    rewards = Rewards(config.rewards, runtime.device)
    train, val, data_record = load_prompts(config.data, tokenizer, config.train.seed,
                                           make_environment() if make_environment else None)
    if environment:
        data_record["environment"] = environment
    if max(len(p.ids) for p in train + val) + config.max_new_tokens > model.config.max_position_embeddings:
        raise OrchardError(f"max_new_tokens: prompts of up to data.max_prompt_length tokens plus "
                           f"{config.max_new_tokens} new ones exceed the model's "
                           f"{model.config.max_position_embeddings} positions")
    reference = ReferenceModel(model, config.peft).to(runtime.device) if keep_reference else None
    trainable, total = apply_peft(model, config.peft, config.train.seed)
    if value_head and not model.config.num_labels:
        model.add_score_head(1, seed=config.train.seed)  # trainable on a frozen base too
        trainable, total = trainable + model.config.hidden_size, total + model.config.hidden_size
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              top_p=getattr(config, "top_p", 1.0), compile=config.compile_decoding)
    rollouts = Rollouts(model, tokenizer, train, rewards, sampling, num_generations, config.train.batch_size,
                        config.train.grad_accum, config.train.seed, runtime, config.num_iterations, make_environment,
                        model.config.max_position_embeddings - config.max_new_tokens, dynamic_sampling)
    return OnlineRun(start, rollouts, val, reference, stage, data_record, (trainable, total))


def train_online(config: OnlineConfig, run: OnlineRun, method) -> TrainResult:
    return finish(run.start, config, method, run.stage, run.data_record, run.parameters,
                  config.data.max_prompt_length + config.max_new_tokens)


def completion_log_probs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                         with_values: bool = False):
    """(N, C) log-probabilities of the completion tokens under `model` at the sampling temperature
    (0 on padding); with
    `with_values`, also the (N, C) score-head outputs at the positions that predict them (PPO's
    value of the state before each token)."""
    C = batch["completion_ids"].size(1)
    # The last C + 1 positions predict the completion and one token past it, which has no target.
    targets = F.pad(batch["completion_ids"], (0, 1), value=IGNORE_INDEX)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=C + 1,
                log_probs_of=targets, temperature=temperature)
    logps = out.log_probs[:, :-1]
    if not with_values:
        return logps
    return logps, out.scores[:, -C - 1:-1, 0].float()
