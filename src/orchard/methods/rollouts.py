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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.packing import EpochOrder, micro_batch_samples
from ..data.preferences import PromptItem, checked_split, read_limited, read_prompts, read_split
from ..data.synthetic import World, verifiable_prompts
from ..errors import OrchardError
from ..losses.tokens import IGNORE_INDEX
from ..model.generation import SamplingConfig, generate
from ..peft.config import ReferenceModel, apply_peft
from ..rewards import Rewards
from ..training import TrainConfig, TrainResult
from ..training.launch import MethodConfig, Start, finish, start_from
from ..training.runtime import Runtime


@dataclass
class PromptDataConfig:
    path: str | list[str] | None = None
    """Prompt files (.jsonl/.jsonl.gz/.json/.parquet): {"prompt": str or messages, "answer": ...},
    {"messages": [...]} or GSM8K's {"question", "answer": "... #### N"}. None means the built-in
    world's fact questions and word problems, with their answers."""
    val_path: str | list[str] | None = None
    """Held-out prompts; None holds out data.val_fraction of data.path (the built-in world's
    held-out split when data.path is None)."""
    val_fraction: float = 0.1
    """Fraction of the prompts held out when data.val_path is not given (at least one)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are skipped (counted)."""
    max_prompts: int | None = None
    """Use at most this many training prompts (from the start)."""
    eval_prompts: int = 200
    """Held-out prompts answered (greedily) at each evaluation."""
    eval_samples: int = 8
    """Replies sampled per held-out prompt at each evaluation, at the training temperature: each
    reward's mean over them (mean@k) and its best per prompt, averaged (pass@k, for a 0/1 reward),
    where RL acts (it sharpens the sampling distribution); 0 evaluates greedy replies only."""
    on_error: str = "error"
    """A malformed record: error (stop, naming it) or skip (counted)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.on_error not in ("error", "skip"):
            raise ValueError(f"data.on_error must be error or skip, got {self.on_error!r}")
        if self.eval_samples < 0:
            raise ValueError(f"data.eval_samples must not be negative, got {self.eval_samples}")


@dataclass
class OnlineConfig(MethodConfig):
    """The recipe fields of the methods that sample their own replies and learn from their rewards."""

    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Weighted rewards, each [WEIGHT*]SOURCE: a built-in (exact_match, numeric_match, answer_format,
    single_line, length_penalty), module:function, model:PATH (a reward model) or judge:PATH."""
    max_new_tokens: int = 64
    """Longest reply sampled."""
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


@dataclass
class Prompt:
    messages: list[dict]
    answer: str | None
    ids: list[int]


def load_prompts(config: PromptDataConfig, tokenizer, seed: int) -> tuple[list[Prompt], list[Prompt], dict]:
    """(training prompts, held-out prompts, a description for the lineage record)."""
    if config.path is None:
        world = World()
        train = [PromptItem(r["prompt"], r["answer"], f"built-in train {i}")
                 for i, r in enumerate(verifiable_prompts(world, "train", num_items=config.max_prompts))]
        val = ([PromptItem(r["prompt"], r["answer"], f"built-in held_out {i}")
                for i, r in enumerate(verifiable_prompts(world, "held_out"))] if config.val_path is None
               else read_limited(read_prompts, config.val_path, config.on_error, "data.val_path", None))
        source = "built-in world questions"
    else:
        train, val = read_split(read_prompts, config.path, config.val_path, config.on_error, config.max_prompts,
                                config.val_fraction, seed)
        source = str(config.path)

    def render(items: list[PromptItem]) -> tuple[list[Prompt], int]:
        prompts, too_long = [], 0
        for item in items:
            ids = tokenizer.encode(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True))
            if len(ids) > config.max_prompt_length:
                too_long += 1
            else:
                prompts.append(Prompt(item.prompt, item.answer, ids))
        return prompts, too_long

    (train_prompts, long_train), (val_prompts, long_val) = render(train), render(val[:config.eval_prompts])
    record = checked_split(train_prompts, val_prompts, long_train + long_val, "prompt", "data.max_prompt_length",
                           config.max_prompt_length, source)
    return train_prompts, val_prompts, record


def turn_end_ids(tokenizer) -> list[int]:
    """Tokens that end a reply: end of text, and the chat template's end of turn."""
    ids = [tokenizer.eos_id]
    for token in ("<|im_end|>", "<|eot_id|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids.append(token_id)
    return ids


class Rollouts:
    """Samples, scores and lays out replies to the training prompts: a pure function of
    (step, micro-batch, rank) and the policy's weights, so a resumed run samples what the
    uninterrupted one would have."""

    def __init__(self, policy, tokenizer, prompts: list[Prompt], rewards: Rewards, sampling: SamplingConfig,
                 num_generations: int, batch_size: int, grad_accum: int, seed: int, runtime: Runtime,
                 num_iterations: int = 1):
        self.policy, self.tokenizer, self.prompts, self.rewards = policy, tokenizer, prompts, rewards
        self.sampling, self.num_generations = sampling, num_generations
        self.batch_size, self.grad_accum, self.seed, self.runtime = batch_size, grad_accum, seed, runtime
        self.num_iterations = num_iterations
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

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        samples = micro_batch_samples(step, micro, rank, world, self.batch_size, self.grad_accum)
        prompts = [self.prompts[self.order[s]] for s in samples for _ in range(self.num_generations)]
        # Each reply's sampler is seeded by its place in the run (sample number, generation), so the
        # replies are the same however the global batch is split over processes and micro-batches.
        seeds = [self.seed * 1_000_003 + s * 1009 + g for s in samples for g in range(self.num_generations)]
        completions = self.sample([p.ids for p in prompts], self.sampling, row_seeds=seeds)
        scored = self.rewards([p.messages for p in prompts], self.texts(completions), [p.answer for p in prompts])
        batch = layout([p.ids for p in prompts], completions, self.tokenizer.pad_id)
        batch["rewards"] = scored.total
        batch["reward_valid"] = scored.valid
        batch["rewards_by_function"] = torch.tensor(
            [[float("nan") if v is None else v for v in scored.by_reward[name]] for name in self.rewards.names]).T
        return batch

    @torch.no_grad()
    def evaluate(self, prompts: list[Prompt], batch_size: int = 32, samples: int = 0) -> dict[str, float]:
        """Greedy replies to `prompts`, scored: each reward's mean over the samples it scored, the
        weighted total's mean over valid samples, and the failures; with `samples` = k, also k
        replies per prompt at the training temperature (seeded by their place, the same at every
        evaluation): each reward's mean@k and pass@k (its best of the k, averaged over prompts)."""
        greedy = SamplingConfig(**{**vars(self.sampling), "temperature": 0.0, "seed": None})
        values: dict[str, list[float]] = {name: [] for name in self.rewards.names}
        totals, failures, lengths = [], 0, []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            completions = self.sample([p.ids for p in chunk], greedy)
            scored = self.rewards([p.messages for p in chunk], self.texts(completions), [p.answer for p in chunk])
            for name in self.rewards.names:
                values[name] += [v for v in scored.by_reward[name] if v is not None]
            totals += scored.total[scored.valid].tolist()
            failures += int((~scored.valid).sum())
            lengths += [len(c) for c in completions]
        metrics = {"val_reward": sum(totals) / max(len(totals), 1),
                   "val_completion_length": sum(lengths) / max(len(lengths), 1),
                   "val_reward_failures": float(failures)}
        for name, found in values.items():
            metrics[f"val_reward/{name}"] = sum(found) / max(len(found), 1)
        if samples:
            metrics.update(self._sampled(prompts, samples, max(1, batch_size // samples)))
        return metrics

    def _sampled(self, prompts: list[Prompt], k: int, prompts_per_batch: int) -> dict[str, float]:
        scores: dict[str, list[list[float]]] = {name: [] for name in self.rewards.names}
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[start:start + prompts_per_batch]
            repeated = [p for p in chunk for _ in range(k)]
            seeds = [1_000_033 * (start + i) + j for i in range(len(chunk)) for j in range(k)]
            completions = self.sample([p.ids for p in repeated], self.sampling, row_seeds=seeds)
            scored = self.rewards([p.messages for p in repeated], self.texts(completions), [p.answer for p in repeated])
            for name in self.rewards.names:
                column = scored.by_reward[name]
                scores[name] += [[v for v in column[i * k:(i + 1) * k] if v is not None] for i in range(len(chunk))]
        metrics = {}
        for name, per_prompt in scores.items():
            scored_prompts = [s for s in per_prompt if s]
            metrics[f"val_mean@{k}/{name}"] = sum(sum(s) / len(s) for s in scored_prompts) / max(len(scored_prompts), 1)
            metrics[f"val_pass@{k}/{name}"] = sum(max(s) for s in scored_prompts) / max(len(scored_prompts), 1)
        return metrics


def layout(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """The training layout of the module docstring: input_ids and attention_mask (N, P + C),
    completion_ids (N, C) with IGNORE_INDEX on padding, completion_mask (N, C)."""
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": completion_ids,
            "completion_mask": completion_ids != IGNORE_INDEX}


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
                       value_head: bool = False) -> OnlineRun:
    """Load `config.init` (merged), its rewards and prompts, keep a reference if asked (before any
    adapter is attached), attach `config.peft` and, for PPO, a value head."""
    start = start_from(config.init, stage, config.train)
    model, tokenizer, runtime = start.model, start.tokenizer, start.runtime
    rewards = Rewards(config.rewards, runtime.device)
    train, val, data_record = load_prompts(config.data, tokenizer, config.train.seed)
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
                        config.train.grad_accum, config.train.seed, runtime, config.num_iterations)
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
