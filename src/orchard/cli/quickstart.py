"""`orchard quickstart`: every stage that exists, on the built-in data, with one report.

Stages so far:
1. pretrain a tokenizer and a small model on the synthetic bilingual world;
2. evaluate it (validation loss, perplexity, bits per byte; fact recall and arithmetic by greedy
   completion) and sample from it in English and Chinese;
3. fine-tune it on the world's instruction conversations, fully and with LoRA, and compare
   held-out exact-match accuracy;
4. align the fine-tuned model: a reward model and DPO on the world's preference pairs, GRPO with
   the exact-match reward on its questions, each reported before and after on held-out data;
5. teach it tools: SFT on conversations that call a calculator and a lookup of the world's facts,
   then GRPO over multi-turn episodes with them, measured with and without the tools;
6. distil the pretrained model (the teacher) into a student of a quarter of its non-embedding
   parameters, from the teacher's cached top-k distributions, beside the same student trained on
   the same tokens without a teacher;
7. quantize the distilled student to int8 and int4 weights and compare them with the rest;
8. keep learning: the fine-tuned model through the built-in three-task stream (word problems,
   English facts, Chinese facts), naively and with replay, with the accuracy matrices;
9. grow the pretrained model from 4 to 6 layers (new blocks start as the identity), check that its
   function is unchanged, and train the new blocks alone;
10. export it for transformers (a Hugging Face directory) and llama.cpp (GGUF f16 and q8_0);
11. evaluate every checkpoint it made on the same tasks, side by side, and draw their family tree;
12. write `report.md` with the metrics, the curves, the samples and the exports.
Each stage is a normal orchard run in its own directory under `--out`, so running quickstart again
resumes (or skips) what is already done.
"""

from __future__ import annotations

import json
import sys
from contextlib import closing
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, read_record
from ..config import Duration, load_config
from ..data.synthetic import World, exact_match_items
from ..errors import OrchardError
from ..evaluation.compare import evaluate_checkpoints
from ..evaluation.completion import arithmetic_items, chat_exact_match, completion_accuracy, fact_completion_items
from ..evaluation.subject import EvalOptions
from ..evaluation.tasks import BitsPerByte, WorldTask
from ..evaluation.tool_tasks import ToolUse
from ..evaluation import transfer_matrix as continual_metrics
from ..evaluation.report import Report, plot_loss_curves, plot_metrics, read_metrics
from ..checkpoint.grow import grow_checkpoint
from ..interop.export import export_hf
from ..interop.gguf import export_gguf
from ..lineage import ancestry
from ..lineage.catalog import catalog_file, connect, scan
from ..lineage.family import Family, format_cost, plot_family
from ..data.packing import PackedSequences, split_tokens
from ..data.text import TextDataConfig, corpus_paths
from ..data.tokens import build_token_cache
from ..methods import continual, distill, dpo, grpo, pretrain, reward, sft
from ..checkpoint.quantize import quantize_checkpoint
from ..model import ModelConfig
from ..model.generation import SamplingConfig, generate_text
from ..training import TrainConfig
from ..training.run_directory import open_run
from ..training.runtime import Runtime

CPU = Runtime.for_inference("cpu")
"""Where the quickstart evaluates: fp32 on the CPU, so its figures are exact and comparable between machines."""
SAMPLE_PROMPTS = ["Tom Snow woke up early in", "Hugo Wood lives in", "37 + 45 =", "汤姆·斯诺住在", "一天早上，"]


def quickstart_config(out: Path, max_time: float) -> pretrain.PretrainConfig:
    """A model small enough to learn the world's templates and facts in minutes on 2 CPU cores."""
    return pretrain.PretrainConfig(
        out=str(out / "pretrain"),
        model=ModelConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512),
        tokenizer=pretrain.TokenizerConfig(vocab_size=2048),
        data=TextDataConfig(seq_len=128, synthetic_documents=20000, val_fraction=0.05),
        train=TrainConfig(max_time=Duration(max_time), batch_size=32, lr=2e-3, warmup_steps=30, eval_every=100,
                          eval_batches=10, save_every=100, log_every=5, seed=1337),
    )


def run_quickstart(out: Path, max_time: float = 240.0, sft_steps: int = 150, eval_items: int = 200,
                   distill_steps: int = 200, continual_steps: int = 60, continual_items: int = 50,
                   grow_steps: int = 60, align_steps: int | None = None, tool_steps: int = 1200) -> Path:
    # Claimed as a run directory: a folder of the user's is refused, and one quickstart runs at a time.
    with open_run(out, "quickstart"):
        report = Report("orchard quickstart", out)
        report.text("The whole pipeline that exists so far, on orchard's built-in synthetic bilingual world "
                    "(stories, facts about generated people, arithmetic in English and Chinese).")

        # 1. Pretraining
        print("[1/11] pretraining on the built-in world", file=sys.stderr)
        config = quickstart_config(out, max_time)
        result = pretrain.run(config)
        metrics = result.state.metrics

        # 2. Evaluation and samples
        print("[2/11] evaluating and sampling", file=sys.stderr)
        checkpoint = load_checkpoint(result.final_dir)
        world = World()
        tasks = {
            "fact recall (English)": fact_completion_items(world, "en", 100),
            "fact recall (Chinese)": fact_completion_items(world, "zh", 100),
            "arithmetic (English)": arithmetic_items("en", 100),
            "arithmetic (Chinese)": arithmetic_items("zh", 100),
        }
        accuracies = {name: completion_accuracy(checkpoint.model, checkpoint.tokenizer, items)
                      for name, items in tasks.items()}
        sampling = SamplingConfig(max_new_tokens=60, temperature=0.7, top_p=0.9, seed=0, stop=["\n\n"])
        samples = generate_text(checkpoint.model, checkpoint.tokenizer, SAMPLE_PROMPTS, sampling)

        first_val = next((row for row in read_metrics(Path(config.out) / "metrics.jsonl") if "val_loss" in row), {})
        record = ancestry(result.final_dir)[0]
        training = record.get("training", {})
        report.heading("Pretraining")
        report.table(["metric", "value"], [
            ["parameters", f"{checkpoint.model.num_parameters():,}"],
            ["training steps", training.get("steps")],
            ["training tokens", f"{training.get('tokens', 0):,}"],
            ["wall time (s)", training.get("wall_seconds")],
            ["training FLOPs", f"{training.get('flops', 0):.3g}"],
            ["precision", training.get("precision")],
            ["validation loss before training (nats/token)", first_val.get("val_loss")],
            ["validation loss after training (nats/token)", metrics.get("val_loss")],
            ["validation perplexity", metrics.get("val_perplexity")],
            ["validation bits per byte", metrics.get("val_bpb")],
            *[[f"{name}, greedy exact match", f"{result_.accuracy:.0%}"] for name, result_ in accuracies.items()],
        ])
        png = plot_loss_curves(Path(config.out) / "metrics.jsonl", out / "pretrain_loss.png",
                               "pretraining on the built-in world")
        report.image(png, "pretraining loss")
        report.text("Samples (temperature 0.7, top-p 0.9):")
        report.samples(list(zip(SAMPLE_PROMPTS, samples)))
        report.text("Greedy completions of held-in facts (first five):")
        examples = accuracies["fact recall (English)"].examples[:5]
        report.table(["prompt", "expected", "model", "correct"],
                     [[p, a, o, "yes" if ok else "no"] for p, a, o, ok in examples])
        report.text(f"Checkpoint: `{result.final_dir}` (try `orchard generate {result.final_dir} --prompt "
                    f"\"Tom Snow\"`, `orchard chat {result.final_dir}`, `orchard info {result.final_dir}`).")

        # 3. Fine-tuning: full SFT and LoRA from the same pretrained checkpoint
        print("[3/11] fine-tuning on instruction conversations (full, then LoRA)", file=sys.stderr)
        held_out = exact_match_items(world, "held_out")[:eval_items]
        runs = {"pretrained (no fine-tuning)": result.final_dir}
        for label, overrides in [("full SFT", ["train.lr=1e-3"]),
                                 ("LoRA r=8 (attention)", ["peft.method=lora", "peft.r=8", "train.lr=5e-3",
                                                           "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]"])]:
            name = "lora" if "peft.method=lora" in overrides else "sft"
            sft_config = load_config(sft.SFTConfig, None, [
                f"init={result.final_dir}", f"out={out / name}", "data.max_length=256", f"train.max_steps={sft_steps}",
                "train.batch_size=16",
                "train.eval_every=50", "train.save_every=50", *overrides])
            runs[label] = sft.run(sft_config).final_dir
        questions = [WorldTask("train", "trained questions"), WorldTask("held_out", "held-out questions")]
        tuned = evaluate_checkpoints(runs, questions, EvalOptions(limit=eval_items, batch_size=32, chat=True), CPU)
        rows = []
        for column, seen_result, held_result in zip(tuned.columns, *tuned.results.values()):
            trainable = read_record(column.path).get("parameters", {}).get("trainable")
            rows.append([column.name, *(f"{r.metrics['exact_match']:.1%}" for r in (seen_result, held_result)),
                         f"{trainable:,} ({trainable / column.parameters:.2%})" if trainable else "-", str(column.path)])
        report.heading("Fine-tuning")
        report.text(f"Questions about the world's facts and arithmetic word problems ({len(held_out)} of each kind of "
                    "split, English and Chinese), answered in the chat format; greedy replies, exact match on the "
                    "answer. 'Trained' questions are from the fine-tuning data; held-out ones ask about facts the "
                    "model saw only in pretraining, so they measure whether fine-tuning reaches its knowledge.")
        report.table(["model", "exact match, trained questions", "exact match, held-out questions",
                      "trained parameters", "checkpoint"], rows)

        # 4. Alignment, from the full SFT model
        print("[4/11] aligning the fine-tuned model: reward model, DPO, GRPO", file=sys.stderr)
        align(out, report, runs["full SFT"], held_out, align_steps, eval_items)

        # 5. Tool use, from the full SFT model
        use_tools(out, report, runs["full SFT"], tool_steps, align_steps, eval_items)

        # 5, 6. Distillation and quantization
        distill_and_quantize(out, report, result.final_dir, distill_steps)

        # 7. Continual learning, from the full SFT model
        keep_learning(out, report, runs["full SFT"], continual_steps, continual_items)

        # 8. Growth, from the pretrained model
        grow_and_train(out, report, config, result.final_dir, grow_steps)

        # 9. Export for other tools
        print("[10/11] exporting for transformers and llama.cpp", file=sys.stderr)
        report.heading("Export")
        rows = [["Hugging Face directory", str(export_hf(result.final_dir, out / "export" / "hf")),
                 _size(out / "export" / "hf" / "model.safetensors")]]
        for dtype in ("f16", "q8_0"):
            try:
                gguf_file = export_gguf(result.final_dir, out / "export" / f"model-{dtype}.gguf", dtype)
                rows.append([f"GGUF {dtype} (llama.cpp)", str(gguf_file), _size(gguf_file)])
            except OrchardError as error:  # the gguf package is optional
                rows.append([f"GGUF {dtype} (llama.cpp)", f"skipped: {error}", ""])
        report.table(["format", "path", "weights"], rows)

        report.heading("Serving")
        report.text("An OpenAI-compatible server with a chat page at http://127.0.0.1:8000 (see the README's "
                    "Serving section):\n\n```bash\n" + "\n".join(serve_commands(out)) + "\n```")

        # 10. Every checkpoint on the same tasks, and the family they form
        compare_everything(out, report, config, eval_items)
        family_tree(out, report)
        return report.write()


def family_checkpoints(out: Path) -> dict[str, Path]:
    """Every model the quickstart made, in the order it made them (the reward model and the
    continual-learning runs are left out: a score head's text metrics mean little, and the continual
    runs have their own matrices)."""
    distilled = out / "distill" / "final"
    return {"pretrained": out / "pretrain" / "final", "SFT": out / "sft" / "final", "LoRA": out / "lora" / "final",
            "DPO": out / "dpo" / "final", "GRPO": out / "grpo" / "final", "student (distilled)": distilled,
            "student (no teacher)": out / "student-no-teacher" / "final",
            "student int8": distilled.parent / "final-int8", "student int4": distilled.parent / "final-int4",
            "grown (6 layers)": out / "grow" / "train" / "final", "tool SFT": out / "tool-sft" / "final",
            "tool GRPO": out / "tool-grpo" / "final"}


def compare_everything(out: Path, report: Report, pretrain_config: pretrain.PretrainConfig, eval_items: int) -> None:
    """One table of every checkpoint on the same tasks (`orchard eval`'s comparison), and its chart."""
    print("[11/11] every checkpoint on the same tasks", file=sys.stderr)
    data = pretrain_config.data
    tasks = [BitsPerByte(windows=lambda tokenizer: validation_windows(data, tokenizer), name="held-out text",
                         max_windows=min(320, 2 * eval_items)),
             WorldTask("held_out", "world, held-out")]
    comparison = evaluate_checkpoints(family_checkpoints(out), tasks, EvalOptions(limit=eval_items, batch_size=32), CPU)
    comparison.write(out / "eval")
    report.heading("Every checkpoint, side by side")
    report.text("`orchard eval` on every model the pipeline made: bits per byte on the pretraining corpus's "
                "held-out windows, and greedy exact match on the world's held-out items. Chat models (SFT and after) "
                "answer the held-out questions in their template; base models complete the held-out facts and "
                "sums, so read each row within its kind. Each column is headed by its lineage; the brackets give "
                "the difference from the pretrained model. The same with your own checkpoints and tasks:\n\n"
                f"```bash\norchard eval {out / 'pretrain'} {out / 'sft'} --tasks world,gsm8k --limit 200\n```")
    report.text(comparison.markdown())
    report.image(out / "eval" / "eval.png", "headline metric of every checkpoint")


def family_tree(out: Path, report: Report) -> None:
    """The quickstart's family from the catalog (`orchard lineage`): the tree drawn, and the reuse
    ledger of the distilled student."""
    scan([out])  # checkpoints of an earlier quickstart, written before the catalog existed, join it
    with closing(connect()) as connection:
        family = Family(connection)
        root = family.find(out / "pretrain")
        png = plot_family(family, root, out / "family_tree.png")
        ledger = format_cost(family.cost(family.find(out / "distill")))
    report.heading("Family tree")
    report.text(f"Every checkpoint orchard writes joins a catalog (`{catalog_file()}`) with how it was made from "
                f"the others. `orchard lineage {out / 'pretrain'} --plot tree.png` draws the pretrained model's "
                f"family; `orchard lineage {out / 'distill'} --cost` is the distilled student's reuse ledger:")
    report.image(png, "the quickstart's family tree")
    report.text("```text\n" + ledger + "\n```")


def serve_commands(out: Path) -> list[str]:
    """`orchard serve` for the quickstart's models: the fine-tuned chat model, and the pretrained base
    with its LoRA chat adapter side by side (the adapter is a model id of its own)."""
    return [f"orchard serve {out / 'sft'}", f"orchard serve {out / 'pretrain'} --adapter chat-lora={out / 'lora'}"]


GRPO_PROMPTS = 128
"""GRPO trains on this many questions, each seen ~7 times in 60 steps of 16: it sharpens the replies
to them (mean@8 on the AMD machine 36% -> 52%, 2.5 minutes), while the held-out questions, about
facts no fine-tuning data has, stay where pretraining left them (with all 1,344 questions, each seen
under once, neither moves)."""

ALIGNMENT_STAGES = {
    # stage: (method, its config, overrides, the held-out metric before/after, its description, curves to plot)
    "reward": (reward.run, reward.RewardConfig, ["train.max_steps=60", "train.lr=1e-4", "train.eval_every=20", "train.save_every=20"],
               "val_accuracy", "held-out pairwise accuracy (chosen scored above rejected)",
               {"training pairwise accuracy": "rewards/accuracies", "held-out pairwise accuracy": "val_accuracy"}),
    "dpo": (dpo.run, dpo.DPOConfig, ["train.max_steps=60", "train.lr=1e-4", "train.eval_every=20", "train.save_every=20"],
            "val_accuracy", "held-out preference accuracy (implicit reward: chosen gained more likelihood than rejected)",
            {"training reward accuracy": "rewards/accuracies", "held-out reward accuracy": "val_accuracy",
             "held-out likelihood accuracy": "val_likelihood_accuracy"}),
    "grpo": (grpo.run, grpo.GRPOConfig, [f"data.max_prompts={GRPO_PROMPTS}", "train.max_steps=60", "train.lr=1e-4",
                                         "train.batch_size=16", "num_generations=8", "max_new_tokens=32", "beta=0",
                                         "loss_aggregation=token", "dynamic_sampling=2", "train.eval_every=30",
                                         "train.save_every=30"],
             "val_reward/exact_match", "held-out exact match (greedy)",
             {"mean reward of the sampled replies": "reward", "held-out exact match (greedy)": "val_reward/exact_match",
              "held-out mean@8 (8 samples at temperature 1)": "val_mean@8/exact_match",
              "held-out pass@8": "val_pass@8/exact_match",
              "trained questions, mean@8": "trained_mean@8/exact_match"}),
}


def align(out: Path, report: Report, sft_dir: Path, held_out: list, steps: int | None = None,
          eval_prompts: int = 200) -> None:
    """The alignment stages from the SFT checkpoint, with one table row and one plot each; `steps`
    replaces each stage's own number of steps (a quick run), `eval_prompts` is GRPO's held-out
    evaluation."""
    rows, images = [], []
    for stage, (run, config_cls, overrides, metric, description, curves) in ALIGNMENT_STAGES.items():
        quick = [f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}"] if steps else []
        evaluation = [f"data.eval_prompts={eval_prompts}",
                      f"data.eval_trained_prompts={min(GRPO_PROMPTS, eval_prompts)}"] if stage == "grpo" else []
        config = load_config(config_cls, None, [f"init={sft_dir}", f"out={out / stage}", "train.log_every=1",
                                                *overrides, *quick, *evaluation])
        result = run(config)
        rows_ = read_metrics(Path(config.out) / "metrics.jsonl")
        before = next((r[metric] for r in rows_ if metric in r), float("nan"))
        after = result.state.metrics.get(metric, float("nan"))
        training = ancestry(result.final_dir)[0].get("training", {})
        rows.append([stage, description, f"{before:.1%}", f"{after:.1%}", training.get("steps"),
                     f"{training.get('wall_seconds', 0):.0f}", str(result.final_dir)])
        images.append((plot_metrics(Path(config.out) / "metrics.jsonl", out / f"{stage}_curves.png",
                                    f"{stage} from the SFT model", curves, "fraction"), f"{stage} curves"))
    dpo_model = load_checkpoint(out / "dpo" / "final")
    dpo_exact = chat_exact_match(dpo_model.model, dpo_model.tokenizer, held_out).accuracy
    dpo_metrics = Path(out / "dpo" / "metrics.jsonl")
    likelihood = [row["val_likelihood_accuracy"] for row in read_metrics(dpo_metrics) if "val_likelihood_accuracy" in row]
    report.heading("Alignment")
    report.text("Each stage starts from the full SFT model. The reward model and DPO train on the world's "
                "preference pairs (a correct answer preferred to a wrong or an unhelpful one) and are measured on "
                "held-out pairs about facts they never saw in a pair; GRPO samples 8 replies per question, is "
                "rewarded by exact match (a reply that lists other candidates is wrong), and is measured on "
                "held-out questions and on the questions it trains on.")
    report.table(["stage", "held-out metric", "before", "after", "steps", "wall time (s)", "checkpoint"], rows)
    report.text(f"DPO: held-out pairs whose chosen reply the model itself finds more likely per token, "
                f"{likelihood[0]:.1%} before and {likelihood[-1]:.1%} after; held-out exact match of the DPO "
                f"model {dpo_exact:.1%}. The held-out questions ask about facts no fine-tuning data mentions, so "
                "what alignment can reach there is bounded by what pretraining taught (see the README).")
    grpo_rows = [row for row in read_metrics(out / "grpo" / "metrics.jsonl") if "val_mean@8/exact_match" in row]
    if grpo_rows:
        report.text("GRPO before and after (RL sharpens the sampling distribution: mean@8 is the average exact "
                    "match of 8 sampled replies, pass@8 the share of questions with at least one right). It "
                    "sharpens the questions it trains on; the held-out ones ask about facts no fine-tuning data "
                    "has, and what it can reach there is what pretraining stored:")
        report.table(["questions", "", "greedy exact match", "mean@8", "pass@8"], [
            [questions, label, *(f"{row[f'{prefix}_{key}/exact_match']:.1%}" for key in ("reward", "mean@8", "pass@8"))]
            for questions, prefix in (("trained", "trained"), ("held-out", "val"))
            if f"{prefix}_mean@8/exact_match" in grpo_rows[0]
            for label, row in (("before", grpo_rows[0]), ("after", grpo_rows[-1]))])
    for png, caption in images:
        report.image(png, caption)


TOOL_SFT = ["data.builtin=tools", "data.max_length=256", "train.lr=1e-3",
            "train.eval_every=300", "train.save_every=300"]
TOOL_GRPO = ["environment=calculator,lookup", "tool_listing=brief", "max_new_tokens=96", "max_turns=3",
             "num_generations=8", "train.batch_size=8", "train.lr=1e-4", "beta=0", "loss_aggregation=token",
             "dynamic_sampling=1", "train.max_steps=20", "train.eval_every=20", "train.save_every=20",
             "train.log_every=1"]
"""Tool use in the quickstart: 1,200 steps of SFT on the built-in tool conversations (calls with two
2-digit numbers to copy need them: 600 steps call the calculator right 62% of the time, 1,200 99%;
900 steps gave 99% from one SFT model and 1.5% from another, which 1,200 steps took to 99%),
then GRPO over episodes with both tools (lr 1e-4: 3e-4 lowered held-out mean@8; one round of dynamic
sampling); a reply may take 96 tokens, a call being ~65."""


def use_tools(out: Path, report: Report, sft_dir: Path, steps: int, grpo_steps: int | None, eval_items: int) -> None:
    """SFT on tool conversations from the SFT model, GRPO over tool episodes from that, and the
    three measured on held-out questions with and without the tools (`--tasks tools`)."""
    print("[5/11] tool use: SFT on tool conversations, then GRPO over episodes with a calculator and a lookup",
          file=sys.stderr)
    sft_config = load_config(sft.SFTConfig, None, [f"init={sft_dir}", f"out={out / 'tool-sft'}",
                                                   f"train.max_steps={steps}", *TOOL_SFT,
                                                   f"data.max_conversations={min(4000, 16 * steps)}"])
    tool_sft = sft.run(sft_config).final_dir
    # A quick run (`grpo_steps`, the tests) also samples fewer and shorter episodes and asks fewer questions.
    quick = [f"train.max_steps={grpo_steps}", f"train.eval_every={grpo_steps}", f"train.save_every={grpo_steps}",
             "train.batch_size=2", "num_generations=4", "max_new_tokens=32"] if grpo_steps else []
    questions = min(eval_items, 4 if grpo_steps else 100)
    grpo_config = load_config(grpo.GRPOConfig, None, [f"init={tool_sft}", f"out={out / 'tool-grpo'}", *TOOL_GRPO,
                                                      f"data.eval_prompts={questions}", *quick])
    tool_grpo = grpo.run(grpo_config).final_dir
    comparison = evaluate_checkpoints({"SFT": sft_dir, "tool SFT": tool_sft, "tool GRPO": tool_grpo},
                                      [ToolUse(name="tools")],
                                      EvalOptions(limit=eval_items if not grpo_steps else questions, batch_size=32,
                                                  chat=True), CPU)
    comparison.write(out / "tool-eval")
    report.heading("Tool use")
    report.text("The SFT model learns to call tools from conversations of the built-in world "
                "(`orchard sft data.builtin=tools`): word problems solved by a calculator call, questions "
                "about people answered from a lookup of their facts, in Qwen2.5's `<tool_call>` format with the "
                "tools named in the system turn; then GRPO samples whole episodes (the model's calls, the tools' "
                "results, its answer: `orchard grpo environment=calculator,lookup`), the tool results in the "
                "context but out of the loss, rewarded by exact match (0 when a call fails). `orchard eval "
                "--tasks tools` asks held-out questions (held-out operands, held-out facts) with the tools offered "
                "and without them; `correct_calls` are episodes whose first call is the right tool and returns "
                "what answers the question.")
    report.text(comparison.markdown())
    rows = [row for row in read_metrics(out / "tool-grpo" / "metrics.jsonl") if "val_mean@8/exact_match" in row]
    if rows:
        report.text("GRPO over tool episodes, on the built-in world's held-out questions (facts and word "
                    "problems; 8 sampled episodes per question at temperature 1):")
        report.table(["", "greedy exact match", "mean@8", "pass@8", "failed tool calls (greedy)"], [
            [label, *(f"{row[key]:.1%}" for key in ("val_reward/exact_match", "val_mean@8/exact_match",
                                                     "val_pass@8/exact_match", "val_tool_failures"))]
            for label, row in (("before", rows[0]), ("after", rows[-1]))])
    report.image(plot_metrics(out / "tool-grpo" / "metrics.jsonl", out / "tools_grpo_curves.png",
                              "GRPO over tool episodes", {"mean reward of the sampled episodes": "reward",
                                                          "held-out mean@8": "val_mean@8/exact_match",
                                                          "held-out exact match (greedy)": "val_reward/exact_match"},
                              "fraction"), "GRPO over tool episodes")


DISTILL_SETTINGS = ["data.seq_len=128", "data.synthetic_documents=20000", "data.val_fraction=0.05",
                    "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=30", "train.eval_every=50",
                    "train.eval_batches=10", "train.save_every=100", "train.log_every=5", "top_k=16",
                    "max_train_windows=3200"]
"""The quickstart's students: 32 windows of 128 tokens per step over the first 3,200 windows of
the pretraining corpus, so the offline cache stays small (16 log-probabilities per token)."""


def distill_and_quantize(out: Path, report: Report, teacher_dir: Path, steps: int) -> None:
    """A quarter-size student with and without the teacher on the same tokens, then quantized."""
    print("[6/11] distilling the pretrained model into a quarter-size student", file=sys.stderr)
    teacher = load_checkpoint(teacher_dir)
    student_file = distill.write_student_config(distill.quarter_width_config(teacher.model.config),
                                                out / "student.yaml")
    students = {}
    for label, name, settings in (("student, distilled (forward KL, alpha 0.5)", "distill", ["alpha=0.5"]),
                                  ("student, same tokens without a teacher", "student-no-teacher", ["alpha=0"])):
        config = load_config(distill.DistillConfig, None, [f"teacher={teacher_dir}", f"student={student_file}",
                                                           f"out={out / name}", f"train.max_steps={steps}",
                                                           *DISTILL_SETTINGS, *settings])
        students[label] = distill.run(config).final_dir

    print("[7/11] quantizing the distilled student (int8, int4)", file=sys.stderr)
    models = {"teacher (the pretrained model)": teacher_dir, **students}
    kd_dir = students["student, distilled (forward KL, alpha 0.5)"]
    for bits, label in ((8, "distilled student, int8 weights"), (4, "distilled student, int4 weights (groups of 32)")):
        models[label] = quantize_checkpoint(kd_dir, kd_dir.parent / f"final-int{bits}", bits,
                                            32 if bits == 4 else None).path

    data = TextDataConfig(seq_len=128, synthetic_documents=20000, val_fraction=0.05)
    held_out = BitsPerByte(windows=lambda tokenizer: validation_windows(data, tokenizer), name="held-out text",
                           max_windows=320)
    compared = evaluate_checkpoints(models, [held_out, WorldTask()], EvalOptions(batch_size=32), CPU)
    kinds = ["exact_match (facts, en)", "exact_match (facts, zh)", "exact_match (sums)"]
    rows = []
    for column, text, world in zip(compared.columns, *compared.results.values()):
        config = load_checkpoint(column.path).model.config
        rows.append([column.name, f"{config.num_parameters(False):,}", f"{text.metrics['bits_per_byte']:.4f}",
                     *(f"{world.metrics[kind]:.1%}" for kind in kinds), _size(column.path / "model.safetensors")])
    report.heading("Distillation and quantization")
    kd_record = read_record(kd_dir)
    cache = kd_record["data"]["teacher_cache"]
    report.text(f"The pretrained model is the teacher. The students have half its width "
                f"({kd_record['parameters']['non_embedding_ratio']:.1%} of its non-embedding parameters) and train "
                f"for {steps} steps on the same windows in the same order; the distilled one learns from the teacher's "
                f"top-{cache['k']} log-probabilities, computed once ({cache['tokens']:,} tokens, "
                f"{cache['bytes_per_token']:.0f} bytes per token) and read back from "
                f"`{cache['path']}` by every later student. Greedy exact match on completions of the "
                f"held-out split's facts and on sums; bits per byte on the held-out windows.")
    report.table(["model", "non-embedding parameters", "held-out bits per byte", "held-out facts (en)",
                  "held-out facts (zh)", "sums", "weights on disk"], rows)
    curves = plot_metrics(out / "distill" / "metrics.jsonl", out / "distill_curves.png",
                          "distilled student", {"divergence from the teacher (training)": "kd_loss",
                                                "held-out forward KL": "val_forward_kl"}, "nats per token")
    report.image(curves, "distillation curves")


CONTINUAL_STRATEGIES = {"naive sequential fine-tuning": ["strategy=naive"],
                        "replay (25% of micro-batches from a 400-example buffer)":
                            ["strategy=replay", "replay_size=400", "replay_ratio=0.25"]}


def keep_learning(out: Path, report: Report, sft_dir: Path, steps: int, items: int) -> None:
    """The three-task stream with and without replay: what naive fine-tuning forgets, and what replay keeps."""
    print("[8/11] continual learning: three tasks in a row, naive and with replay", file=sys.stderr)
    report.heading("Continual learning")
    report.text(f"The full SFT model learns three tasks in a row ({steps} steps on 100 items each): word problems "
                "(answers it has to memorise), then English facts, then Chinese facts. After each task every task "
                f"is scored by greedy exact match on its first {items} taught items (`eval_on=train`: how much of "
                "what was taught is retained). Forgetting is the mean drop of each earlier task from its best score.")
    rows = []
    for label, settings in CONTINUAL_STRATEGIES.items():
        name = settings[0].split("=")[1]
        config = load_config(continual.ContinualConfig, None, [
            f"init={sft_dir}", f"out={out / 'continual' / name}", "eval_on=train", f"eval_items={items}",
            "data.train_items=100", f"train.max_steps={steps}", "train.lr=5e-4", "train.batch_size=16",
            "train.warmup_steps=10",
            "train.eval_every=0", "train.save_every=50", "data.max_length=256", *settings])
        continual.run(config)
        result = json.loads((Path(config.out) / "continual.json").read_text(encoding="utf-8"))
        summary = result["summary"]
        rows.append([label, f"{summary['average_accuracy']:.0%}", f"{summary['forgetting']:.0%}",
                     f"{result['R'][-1][-1]:.0%}"])
        report.text(f"{label}: R[i][j], the score on task j after training task i")
        report.table(["after training", *result["tasks"]],
                     continual_metrics.markdown_table(result["R"], result["tasks"]))
    report.table(["strategy", "average accuracy at the end", "forgetting", "last task"], rows)
    report.image(out / "continual" / "replay" / "R.png", "accuracy matrix with replay")


def grow_and_train(out: Path, report: Report, pretrain_config: pretrain.PretrainConfig, parent: Path,
                   steps: int) -> None:
    """4 -> 6 layers by identity blocks (LLaMA Pro), the same function, then only the new blocks train."""
    print("[9/11] growing the pretrained model from 4 to 6 layers and training the new blocks", file=sys.stderr)
    grown_dir = out / "grow" / "grown"
    grown = grow_checkpoint(parent, grown_dir, layers=6)
    source, target = load_checkpoint(parent), load_checkpoint(grown_dir)
    data = pretrain_config.data
    probe = validation_windows(data, source.tokenizer).batch(range(8))["input_ids"]
    with torch.no_grad():
        difference = (source.model.float()(probe).logits - target.model.float()(probe).logits).abs().max().item()
    config = load_config(pretrain.PretrainConfig, None, [
        f"init={grown_dir}", "init_trainable=new", f"out={out / 'grow' / 'train'}", f"train.max_steps={steps}",
        "train.lr=1e-3", "train.warmup_steps=10", "train.eval_every=20", "train.eval_batches=10",
        "train.save_every=50", "train.log_every=5", "train.batch_size=32", f"data.seq_len={data.seq_len}",
        f"data.synthetic_documents={data.synthetic_documents}", f"data.val_fraction={data.val_fraction}"])
    result = pretrain.run(config)
    metrics = read_metrics(Path(config.out) / "metrics.jsonl")
    first = next(row for row in metrics if "val_loss" in row)
    trained = read_record(result.final_dir)["parameters"]["trainable"]
    report.heading("Growing a model")
    report.text(f"`orchard grow` inserts two new blocks (after blocks {', '.join(map(str, grown.new_layers))}: "
                f"their output projections start at zero, so each is the identity) and training continues through "
                f"the normal engine with only the new blocks trainable (`init_trainable=new`, "
                f"{trained:,} of {grown.parameters_after:,} parameters).")
    report.table(["metric", "value"], [
        ["parameters", f"{grown.parameters_before:,} -> {grown.parameters_after:,}"],
        ["largest logit difference, grown vs parent (fp32, 8 validation windows)", f"{difference:.2e}"],
        ["validation loss of the grown model before training (nats/token)", f"{first['val_loss']:.4f}"],
        [f"validation loss after {steps} steps of the new blocks", f"{result.state.metrics['val_loss']:.4f}"],
        ["checkpoint", str(result.final_dir)],
    ])


def validation_windows(data: TextDataConfig, tokenizer) -> PackedSequences:
    """The pretraining corpus's validation windows, as pretraining split them."""
    tokens = build_token_cache(corpus_paths(data), tokenizer).tokens
    return PackedSequences(split_tokens(tokens, data.val_fraction, data.seq_len)[1], data.seq_len)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
