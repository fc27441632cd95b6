"""What GRPO does, beside TRL: held-out exact match before and after orchard's `orchard.methods.grpo`
and after TRL's GRPOTrainer, from the same SFT model with the same data, steps and settings.

    python benchmarks/grpo_effect_vs_trl.py                       # quickstart SFT model, 30 steps each
    python benchmarks/grpo_effect_vs_trl.py --quick               # a smoke run: 2 steps, 8 held-out prompts
    python benchmarks/grpo_effect_vs_trl.py --sft runs/quickstart/sft/final --steps 30 --loss token

(TRL: `pip install -e '.[bench]'`; run `orchard quickstart` first, or give --sft.) Measured: the
effect of training, not its speed. Each side trains in its own process (same torch threads), then
one process evaluates the SFT model ("before") and both final models the same way, with orchard's
evaluator (`Rollouts.evaluate`) on the built-in world's held-out questions (the first
--eval-prompts): greedy exact match, and 8 replies per question at the training temperature and
max new tokens, seeded by their place (the same seeds for every model), giving mean@8 and pass@8.
TRL's output directory (a transformers model) is loaded with `orchard.checkpoint.load_checkpoint`,
as any Hugging Face directory is; the SFT model's export is checked to load back with the same
logits, so the round trip itself changes nothing. One table (before / orchard after / TRL after:
greedy, mean@8, pass@8, gain in mean@8, training wall seconds) is printed and written to
--out/results.json with the settings, the checks and each step's training reward.

How the two runs are made equal:

* weights: the SFT checkpoint, exported with `orchard.interop.export.export_hf`; transformers'
  logits are checked to match orchard's, and its tokenizer's chat template to render every
  training and held-out prompt to the same ids (`alignment_vs_trl.check_same_model`);
* data: the built-in world's training questions as orchard's GRPO loads them (`load_prompts`, no
  data.path), in the order orchard's engine takes them (`EpochOrder` with the seed), written to the
  dataset TRL reads with shuffle_dataset=False; TRL's reward calls record which prompts it saw,
  checked against that order; exact-match reward (orchard's `exact_match` in both);
* a step: --prompts-per-step (B) prompts x --num-generations (G) replies, sampled once and used for
  one optimizer step (TRL: per_device_train_batch_size = B x G, steps_per_generation=1,
  num_iterations=1, gradient_accumulation_steps=1); temperature as given, no top-k or top-p, at
  most --max-new-tokens, replies ending at end-of-text or the end-of-turn token on both sides,
  truncated replies kept in the loss;
* loss: the clipped surrogate (epsilon 0.2 both ways), advantages (r - group mean) / (group std +
  1e-4) with the n-1 std (TRL's scale_rewards="group"); --loss sequence is orchard's
  loss_aggregation=sequence = TRL's loss_type="grpo", --loss token is token = "dapo"; --beta times
  the k3 KL to the starting model (TRL with use_bias_correction_kl=False, its default multiplying
  the KL by the importance ratio, which orchard does not do); beta 0 keeps no reference on either;
* optimizer: AdamW, fused, betas 0.9/0.95 (orchard's TrainConfig default; TRL's default 0.999 is
  overridden), eps 1e-8, weight decay 0 (orchard's GRPO default and TRL's), gradient clip 1.0;
  learning rate --lr, constant after --warmup linear warm-up steps (default 0) on both: orchard with
  min_lr_ratio=1 (no cosine), TRL with a LambdaLR of orchard's formula lr x min(1, (step+1)/warmup)
  (transformers' constant_with_warmup starts from 0, orchard from lr/warmup);
* precision fp32, no compilation, no gradient checkpointing, on the CPU, the same seed.

Where they still differ: the random streams (orchard seeds each reply's sampler by its place in
the run, transformers' `generate` draws from torch's global generator), so the sampled replies
differ while their distribution does not; with 30 steps that makes single runs noisy, so compare
several --seed values before reading a small difference. --dynamic-sampling (DAPO's) is orchard's
alone: TRL has no equivalent (see DYNAMIC_SAMPLING_NOTE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment_vs_trl import (MARK, check_same_model, cpu_name, epoch_order, exact_match_reward,  # noqa: E402
                              read_jsonl, run_worker_process, trl_common, trl_grpo_args, trl_policy, trl_timer,
                              write_jsonl)

EVAL_SAMPLES = 8  # replies per held-out prompt: mean@8, pass@8
LOSSES = {"sequence": ("sequence", "grpo"), "token": ("token", "dapo")}  # --loss: (orchard, TRL)
DYNAMIC_SAMPLING_NOTE = (
    "TRL has no equivalent of dynamic sampling: checked in TRL 1.16.0, GRPOTrainer neither drops nor refills "
    "groups whose rewards are all equal (it only logs their share, frac_reward_zero_std), nor does the "
    "experimental async GRPO trainer; the feature request (huggingface/trl#3708) is open and its pull request "
    "(#3758) was closed. So TRL trains on every group, zero-advantage ones included")


# --- setup (parent process) ----------------------------------------------------------------------

def prepare(args, work: Path) -> dict:
    """The SFT model's transformers export, the training prompts in orchard's order for TRL, and the
    checks that both sides start from the same model and prompts."""
    from orchard.checkpoint import load_checkpoint
    from orchard.interop.export import export_hf
    from orchard.methods.prompts import PromptDataConfig, load_prompts

    sft = load_checkpoint(args.sft)
    hf_dir = export_hf(sft.path, work / "hf")
    train, val, _ = load_prompts(PromptDataConfig(eval_prompts=args.eval_prompts), sft.tokenizer, args.seed)
    samples = args.steps * args.prompts_per_step
    ordered = [{"prompt": train[i].messages, "answer": train[i].answer,
                "rivals": None if train[i].rivals is None else list(train[i].rivals)}
               for i in epoch_order(len(train), samples, args.seed)]
    files = {"checkpoint": str(sft.path), "hf": str(hf_dir), "work": str(work),
             "trl_train": str(write_jsonl(work / "trl_train.jsonl", ordered))}
    checks = check_same_model(files, ordered + [{"prompt": p.messages} for p in val], [])
    # TRL's model comes back through load_checkpoint as a Hugging Face directory: the SFT model's
    # export must come back with the logits it left with.
    back = load_checkpoint(hf_dir).model.float().eval()
    ids = torch.tensor([val[0].ids])
    with torch.no_grad():
        difference = (back(ids).logits - sft.model.float().eval()(ids).logits).abs().max().item()
    if difference > 1e-5:
        raise SystemExit(f"the export loads back into orchard with other logits ({difference:.1e}): evaluating "
                         f"TRL's model would not be fair")
    checks["round_trip_logit_difference"] = difference
    checks.update(train_prompts=len(train), held_out_prompts=len(val), training_samples=samples)
    files["checks"] = checks
    return files


# --- workers -------------------------------------------------------------------------------------

def train_orchard(files: dict, args, out: Path) -> dict:
    from orchard.methods import grpo
    from orchard.methods.prompts import PromptDataConfig
    from orchard.training import TrainConfig

    config = grpo.GRPOConfig(
        init=files["checkpoint"], out=str(out), rewards=["exact_match"], num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0, beta=args.beta, epsilon=0.2,
        loss_aggregation=LOSSES[args.loss][0], scale_rewards=True, advantage_estimator="grpo",
        dynamic_sampling=args.dynamic_sampling, num_iterations=1,
        # The run's own end-of-training evaluation is kept minimal: the evaluate worker does it for all.
        data=PromptDataConfig(eval_prompts=1, eval_samples=0),
        train=TrainConfig(max_steps=args.steps, batch_size=args.prompts_per_step, grad_accum=1, lr=args.lr,
                          warmup_steps=args.warmup, min_lr_ratio=1.0, weight_decay=0.0, beta1=0.9, beta2=0.95,
                          grad_clip=1.0, precision="fp32", device="cpu", eval_every=0, save_every=0, log_every=1,
                          seed=args.seed, progress=False, compile=False))
    result = grpo.run(config)
    rows = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "elapsed" in r]
    return {"final": str(result.final_dir), "train_seconds": rows[-1]["elapsed"],
            "reward": [r["reward"] for r in rows], "frac_reward_zero_std": [r["frac_reward_zero_std"] for r in rows],
            "completion_length": [r["completion_length"] for r in rows], "lr": [r["lr"] for r in rows],
            "resample_rounds": [r.get("resample_rounds", 0.0) for r in rows]}


def train_trl(files: dict, args, out: Path) -> dict:
    from datasets import Dataset
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = read_jsonl(files["trl_train"])
    seen: list[str] = []

    def exact_match(prompts, completions, answer, **kwargs):
        """orchard's exact match, noting the question of each group TRL scores."""
        seen.extend(p[-1]["content"] for p in prompts[::args.num_generations])
        return exact_match_reward(prompts, completions, answer, **kwargs)

    warmup = args.warmup
    rates: list[float] = []

    class LearningRates(TrainerCallback):
        """The learning rate each optimizer step uses (transformers logs the next step's)."""

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            rates.append(optimizer.param_groups[0]["lr"])

    class Trainer(GRPOTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            # orchard's schedule with min_lr_ratio=1: lr x (step+1)/warmup during warm-up, then lr.
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                             lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
            return self.lr_scheduler

    model, tokenizer = trl_policy(files["hf"])
    # The export's generation_config.json samples at 0.8 / top-p 0.95; TRL passes its own settings,
    # and these make sure nothing of the file's is left to fall back on.
    model.generation_config.update(temperature=args.temperature, top_p=1.0, top_k=0)
    config = GRPOConfig(**{**trl_common("fp32", args.steps, str(out), args.lr, False, args.seed),
                           "lr_scheduler_type": "constant"},
                        **trl_grpo_args(args.prompts_per_step, args.num_generations, args.max_new_tokens,
                                        args.temperature, args.beta, LOSSES[args.loss][1]))
    timer = trl_timer()
    trainer = Trainer(model=model, reward_funcs=exact_match, args=config, train_dataset=Dataset.from_list(records),
                      processing_class=tokenizer, callbacks=[timer, LearningRates()])
    trainer.train()
    trainer.save_model(str(out / "final"))
    log = [r for r in trainer.state.log_history if "reward" in r]
    expected = [r["prompt"][-1]["content"] for r in records]
    return {"final": str(out / "final"), "train_seconds": timer.ends[-1] - timer.start,
            "reward": [r["reward"] for r in log], "frac_reward_zero_std": [r["frac_reward_zero_std"] for r in log],
            "completion_length": [r["completions/mean_length"] for r in log], "lr": rates,
            "same_prompt_order": seen == expected,
            "prompts_seen": len(seen), "mixed_precision": trainer.accelerator.mixed_precision,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
            "optimizer_settings": {k: v for k, v in trainer.optimizer.param_groups[0].items()
                                   if k in ("betas", "eps", "weight_decay", "fused")}}


def evaluate(files: dict, args) -> dict:
    """The SFT model and both final models, each by orchard's evaluator on the same held-out prompts
    with the same seeds, the SFT tokenizer's rendering checked to be each model's too."""
    from orchard.checkpoint import load_checkpoint
    from orchard.methods.prompts import PromptDataConfig, load_prompts
    from orchard.methods.rollouts import Rollouts
    from orchard.model.generation import SamplingConfig
    from orchard.rewards import Rewards
    from orchard.training.runtime import Runtime

    sft = load_checkpoint(files["checkpoint"])
    _, val, _ = load_prompts(PromptDataConfig(eval_prompts=args.eval_prompts), sft.tokenizer, args.seed)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0)
    results = {}
    for label, path in (("before", files["checkpoint"]), ("orchard", files.get("orchard_final")),
                        ("trl", files.get("trl_final"))):
        if path is None:
            continue
        checkpoint = load_checkpoint(path)
        tokenizer = checkpoint.tokenizer
        if any(tokenizer.encode(tokenizer.apply_chat_template(p.messages, add_generation_prompt=True)) != p.ids
               for p in val):
            raise SystemExit(f"{path}: its tokenizer renders the held-out prompts differently from the SFT model's")
        rollouts = Rollouts(checkpoint.model.float().eval(), tokenizer, val, Rewards(["exact_match"]), sampling,
                            args.num_generations, 1, 1, args.seed, Runtime(torch.device("cpu"), "fp32"))
        started = time.perf_counter()
        metrics = rollouts.evaluate(val, samples=EVAL_SAMPLES)
        results[label] = {"path": str(path), "greedy": metrics["val_reward/exact_match"],
                          "mean@8": metrics[f"val_mean@{EVAL_SAMPLES}/exact_match"],
                          "pass@8": metrics[f"val_pass@{EVAL_SAMPLES}/exact_match"],
                          "greedy_completion_length": metrics["val_completion_length"],
                          "eval_seconds": time.perf_counter() - started}
    return results


def run_worker(name: str, args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    files = json.loads(Path(args.files).read_text())
    if name == "evaluate":
        result = evaluate(files, args)
    else:
        result = {"orchard": train_orchard, "trl": train_trl}[name](files, args, Path(files["work"]) / name)
    result["threads"] = torch.get_num_threads()
    print(MARK + json.dumps(result), flush=True)


# --- the parent: train both, evaluate all three, print the table ---------------------------------

SHARED = ("steps", "prompts_per_step", "lr", "warmup", "temperature", "max_new_tokens", "num_generations", "beta",
          "loss", "dynamic_sampling", "eval_prompts", "seed", "threads")


def spawn(name: str, args, files_path: Path) -> dict | None:
    command = [sys.executable, __file__, "--worker", name, "--files", str(files_path)]
    for key in SHARED:
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return run_worker_process(name, command, args.threads)


def main() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="runs/quickstart/sft/final", help="the starting model (an orchard checkpoint)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each side")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="B, prompts per step (x G replies)")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of both (the quickstart's GRPO)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps of both, then constant")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, training and mean@8")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest reply, training and evaluation")
    parser.add_argument("--num-generations", type=int, default=8, help="G, replies per prompt in training")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    parser.add_argument("--loss", choices=list(LOSSES), default="sequence",
                        help="sequence: orchard's loss_aggregation=sequence, TRL's loss_type=grpo; token: "
                             "token / dapo")
    parser.add_argument("--dynamic-sampling", type=int, default=0,
                        help="orchard only: DAPO's dynamic sampling, up to N refill rounds (TRL has none)")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts evaluated (default 200; 8 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="data order and sampling seed of both")
    parser.add_argument("--threads", type=int, default=cores, help=f"torch threads of every process (default {cores})")
    parser.add_argument("--out", default="runs/grpo_effect_vs_trl", help="the runs, the export and results.json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 8 held-out prompts")
    parser.add_argument("--worker", choices=["orchard", "trl", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args)
        return
    if args.quick:
        args.steps = 2
        args.eval_prompts = args.eval_prompts or 8
    args.eval_prompts = args.eval_prompts or 200
    if args.temperature <= 0:
        parser.error("--temperature must be positive: GRPO samples")

    import transformers
    import trl

    work = Path(args.out)
    for name in ("orchard", "trl", "hf"):  # an orchard run directory left there would be resumed, not rerun
        if (work / name).exists():
            raise SystemExit(f"{work / name} exists: give another --out")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = prepare(args, work)
    checks = files["checks"]
    files_path = work / "files.json"
    files_path.write_text(json.dumps(files))
    print(f"machine: {cpu_name()}, {cores} cores available, {args.threads} torch threads per process, fp32; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}")
    print(f"model: {args.sft}, {checks['parameters'] / 1e6:.1f}M parameters; transformers loads its export as "
          f"{checks['hf_class']} (max |logit difference| {checks['max_logit_difference']:.1e}, back into orchard "
          f"{checks['round_trip_logit_difference']:.1e}); {checks['prompts_checked']} prompts render to the same ids")
    print(f"data: {checks['training_samples']} of the built-in world's {checks['train_prompts']} training questions "
          f"in orchard's order; {checks['held_out_prompts']} held-out questions evaluated")
    print(f"runs (each in its own process), set-up {time.perf_counter() - started:.0f}s:", flush=True)
    runs = {side: spawn(side, args, files_path) for side in ("orchard", "trl")}
    for side, run in runs.items():
        if run:
            files[f"{side}_final"] = run["final"]
    files_path.write_text(json.dumps(files))
    scores = spawn("evaluate", args, files_path) or {}
    report(args, runs, scores, checks, work)


def report(args, runs: dict, scores: dict, checks: dict, work: Path) -> None:
    before = scores.get("before")
    rows = []
    for label, key in (("before (SFT)", "before"), ("orchard after", "orchard"), ("TRL after", "trl")):
        s, run = scores.get(key), runs.get(key)
        gain = s["mean@8"] - before["mean@8"] if s and before and key != "before" else None
        rows.append([label, *(f"{s[m]:.1%}" if s else "-" for m in ("greedy", "mean@8", "pass@8")),
                     "" if key == "before" else (f"{gain:+.1%}" if gain is not None else "-"),
                     "" if key == "before" else (f"{run['train_seconds']:.0f}" if run else "failed")])
    header = ["", "greedy EM", "mean@8", "pass@8", "mean@8 gain", "train s"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    print()
    loss_o, loss_t = LOSSES[args.loss]
    settings = (f"settings: {args.steps} steps x {args.prompts_per_step} prompts x G={args.num_generations}, "
                f"temperature {args.temperature}, <= {args.max_new_tokens} new tokens, lr {args.lr} constant after "
                f"{args.warmup} warm-up steps, AdamW 0.9/0.95 no weight decay, clip 1.0, beta {args.beta}, "
                f"epsilon 0.2, group-std advantages, loss {args.loss} (orchard loss_aggregation={loss_o}, TRL "
                f"loss_type={loss_t}), fp32, seed {args.seed}, {args.threads} threads; evaluation: "
                f"{checks['held_out_prompts']} held-out questions, greedy and {EVAL_SAMPLES} samples each at the "
                f"training temperature, the same seeds for every model")
    print(settings)
    notes = []
    for side, name in (("orchard", "orchard"), ("trl", "TRL")):
        run = runs.get(side)
        if run and run["reward"]:
            k = max(1, len(run["reward"]) // 4)
            first, last = statistics.fmean(run["reward"][:k]), statistics.fmean(run["reward"][-k:])
            notes.append(f"{name} training reward (mean of the sampled replies): first {k} steps {first:.1%}, "
                         f"last {k} {last:.1%}; "
                         f"groups with equal rewards {statistics.fmean(run['frac_reward_zero_std']):.0%}; mean reply "
                         f"{statistics.fmean(run['completion_length']):.1f} tokens")
    trl_run = runs.get("trl")
    if trl_run and runs.get("orchard"):
        same = len(trl_run["lr"]) == len(runs["orchard"]["lr"]) and all(
            abs(a - b) <= 1e-12 * max(abs(b), 1.0) for a, b in zip(trl_run["lr"], runs["orchard"]["lr"]))
        notes.append(f"the same learning rate at every step: {'yes' if same else 'NO'} (orchard "
                     f"{runs['orchard']['lr'][:3]}..., TRL {trl_run['lr'][:3]}...)")
    if trl_run:
        notes.append(f"TRL took the prompts in orchard's order: {'yes' if trl_run['same_prompt_order'] else 'NO'} "
                     f"({trl_run['prompts_seen']} groups); its optimizer {trl_run['optimizer']} "
                     f"{trl_run['optimizer_settings']}, mixed precision {trl_run['mixed_precision']}")
    if args.dynamic_sampling:
        orchard_run = runs.get("orchard")
        rounds = statistics.fmean(orchard_run["resample_rounds"]) if orchard_run else float("nan")
        notes.append(f"dynamic sampling {args.dynamic_sampling} (orchard only, {rounds:.1f} refill rounds per step "
                     f"on average): {DYNAMIC_SAMPLING_NOTE}")
    notes.append("training seconds: orchard's metrics.jsonl `elapsed` at the last step, TRL's on_train_begin to the "
                 "last on_step_end (loading, saving and evaluation left out on both)")
    for note in notes:
        print(f"  {note}")
    if before and all(k in scores for k in ("orchard", "trl")):
        gain_o, gain_t = (scores[k]["mean@8"] - before["mean@8"] for k in ("orchard", "trl"))
        print(f"mean@8 gain: orchard {gain_o:+.1%}, TRL {gain_t:+.1%}: orchard's gain is "
              f"{'at least' if gain_o >= gain_t else 'below'} TRL's (one seed; the sampled replies differ between the "
              f"two, so repeat with other --seed values before reading a small difference)")
    result = {"settings": {k: getattr(args, k) for k in SHARED} | {"sft": args.sft, "eval_samples": EVAL_SAMPLES,
                                                                   "orchard_loss_aggregation": loss_o,
                                                                   "trl_loss_type": loss_t},
              "checks": checks, "evaluation": scores, "training": runs, "notes": notes,
              "dynamic_sampling_in_trl": DYNAMIC_SAMPLING_NOTE}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    print(f"written: {work / 'results.json'}")


if __name__ == "__main__":
    main()
