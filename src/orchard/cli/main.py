"""The `orchard` command: one subcommand per stage of a model's life.

User mistakes (a missing file, a malformed record, a bad config value) are `OrchardError`s and
print as one line with exit status 2, as does a refusal of the machine (a full disk, a folder that
cannot be written: an `OSError`); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from .. import __version__
from ..errors import OrchardError
from ..methods.registry import COMMANDS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def _recipe_help(config_cls) -> str:
    from ..config import describe

    lines = ["config keys (set in a recipe YAML or as key=value):"]
    for key, default, doc in describe(config_cls):
        lines.append(f"  {key} = {default}")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(doc, 80))
    return "\n".join(lines)


CHECKPOINT_HELP = "checkpoint or run directory, or a Hugging Face model directory, or hf:ORG/NAME for a Hub model"
FORCE_HELP = "replace an existing --out that orchard did not write from this input (never an input itself)"


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="bf16 autocast or fp32; auto: bf16 on a GPU, fp32 on the CPU (exact)")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default 1)")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for repeatable samples")
    parser.add_argument("--compile", action="store_true",
                        help="decode with a static KV cache and a compiled step: faster per token, after a "
                             "compilation of seconds (worth it for long replies and chat sessions)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchard", formatter_class=HelpFormatter,
        description="Train a language model through its whole life, each stage reusing the last.",
        epilog="Start with `orchard quickstart`; `orchard COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"orchard {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    quick = commands.add_parser("quickstart", formatter_class=HelpFormatter,
                                help="the whole pipeline on the built-in data, with a report",
                                description="Train a tokenizer and a small model on the built-in synthetic "
                                            "world, evaluate it, sample from it and write DIR/report.md.")
    quick.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    quick.add_argument("--max-time", default="4m", help="pretraining time budget (default 4m)")

    tokenizer = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train_tok = tokenizer_commands.add_parser("train", help="train a tokenizer on a corpus",
                                              description="Train a byte-level BPE tokenizer and save "
                                                          "tokenizer.json and tokenizer_config.json into --out.")
    train_tok.add_argument("--data", required=True, nargs="+", help="corpus files or globs (.txt .jsonl .parquet)")
    train_tok.add_argument("--out", required=True, help="directory to write the tokenizer into")
    train_tok.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    train_tok.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet records")
    train_tok.add_argument("--force", action="store_true", help=FORCE_HELP)

    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, formatter_class=HelpFormatter, help=command.help,
                                  description=command.description + " Running the same command again resumes from "
                                                                    "the last checkpoint.",
                                  epilog=_recipe_help(command.config))
        if name == "distill":
            sub.add_argument("--student", default=None, metavar="CONFIG_OR_CKPT",
                             help="the student: a checkpoint, or a .yaml of model fields for a fresh one")
        sub.add_argument("recipe", nargs="?", help="a recipe YAML (see recipes/)" +
                         ("; or the teacher checkpoint, followed by an optional recipe" if name == "distill" else ""))
        sub.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {command.example}")

    generate = commands.add_parser("generate", help="continue a prompt (streams tokens)",
                                   description="Sample a continuation of --prompt from a checkpoint.")
    generate.add_argument("checkpoint", help=CHECKPOINT_HELP)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--num-samples", type=int, default=1, help="independent samples (default 1)")
    generate.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                          help="an adapter checkpoint trained on this base (repeatable: the adapters share "
                               "the base and run side by side in one batch)")
    _add_sampling_arguments(generate)

    chat = commands.add_parser("chat", help="talk to a model in the terminal",
                               description="A chat REPL using the checkpoint's chat template. "
                                           "Commands: /reset clears the conversation, /quit leaves.")
    chat.add_argument("checkpoint", help=CHECKPOINT_HELP)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_arguments(chat)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible server and a chat page",
        description="Serve a checkpoint (and LoRA adapters trained on it) over OpenAI's HTTP API: "
                    "/v1/chat/completions, /v1/completions, /v1/models, with streaming; /health, /metrics "
                    "(Prometheus) and a chat page at /. Requests decode together (continuous batching); "
                    "SIGTERM or Ctrl-C lets running requests finish, then exits.")
    serve.add_argument("checkpoint", help=CHECKPOINT_HELP)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="an adapter checkpoint trained on this base, served as model NAME (repeatable)")
    serve.add_argument("--model-name", default=None, help="the base's model id (default: the checkpoint folder's name, or the run's for a run directory)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require this bearer key on /v1 routes (default: $ORCHARD_API_KEY, else none)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoding at once (default 32)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="sequences waiting for a slot before requests get 429 (default 256)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="prompt plus reply, in tokens (default: the model's context length)")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a request may decode before it ends with finish_reason length (default 600)")
    _add_runtime_arguments(serve)

    evaluate = commands.add_parser(
        "eval", help="standard tasks on one or more checkpoints, side by side",
        description="Evaluate checkpoints on tasks (local files only) and print one table with a column per "
                    "checkpoint, its lineage at the head and deltas against the first. Tasks: bpb:PATH (bits per "
                    "byte, perplexity), gsm8k[:PATH] (default ../shared/data/math/gsm8k_test.jsonl), mc:PATH "
                    "(multiple choice by log-likelihood: JSONL of question, choices, answer), world (the built-in "
                    "world's held-out items), pairs:PATH (preference accuracy), judge:PATH (win rate against "
                    "--reference, judged by --judge). Chat models (SFT, preference or RL training in their "
                    "lineage) answer in their chat template, base models get k-shot prompts.")
    evaluate.add_argument("checkpoint", nargs="+", help=CHECKPOINT_HELP + "; several are compared side by side")
    evaluate.add_argument("--tasks", help="comma-separated tasks, e.g. world,gsm8k,mc:arc.jsonl,bpb:corpus.txt")
    evaluate.add_argument("--data", nargs="+", help="corpus files or globs: the same as a bpb task")
    evaluate.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet records (bpb)")
    evaluate.add_argument("--limit", type=int, default=None, help="items per task (windows for bpb; default all)")
    evaluate.add_argument("--batch-size", type=int, default=16,
                          help="rows per forward pass, and replies generated at once (default 16)")
    evaluate.add_argument("--seq-len", type=int, default=256, help="bpb: tokens per window (default 256)")
    evaluate.add_argument("--shots", type=int, default=5, help="gsm8k: worked examples for base models (default 5)")
    evaluate.add_argument("--samples", type=int, default=1,
                          help="gsm8k: sampled answers per question besides the greedy one; >1 adds maj@k, "
                               "pass@k and mean@k (default 1: greedy only)")
    evaluate.add_argument("--temperature", type=float, default=0.7, help="temperature of --samples (default 0.7)")
    evaluate.add_argument("--max-new-tokens", type=int, default=256,
                          help="longest reply of gsm8k and judge (default 256)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sampled answers (default 0)")
    evaluate.add_argument("--judge", help="judge: the checkpoint that compares the replies")
    evaluate.add_argument("--judge-mode", choices=["pairwise", "grade"], default="pairwise",
                          help="judge: pairwise (shown both replies, in both orders) or grade (each reply graded "
                               "0-10 alone, as orchard's RLAIF judges are trained; default pairwise)")
    evaluate.add_argument("--reference", help="judge: the checkpoint replied against; pairs: the implicit reward's "
                                              "reference (default: each checkpoint's parent)")
    evaluate.add_argument("--format", choices=["auto", "chat", "base"], default="auto",
                          help="answer in the chat template or as a base model (default: from the lineage)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.add_argument("--out", help="also write eval.json, eval.md and eval.png (the chart) into this directory")
    _add_runtime_arguments(evaluate)

    harness = commands.add_parser(
        "lm-eval", add_help=False, help="EleutherAI's lm-evaluation-harness with orchard checkpoints as --model orchard",
        description="lm-eval's own command line (every argument goes to it) with the `orchard` model "
                    "registered: orchard lm-eval --model orchard --model_args pretrained=CKPT,device=cpu "
                    "--tasks TASK. Needs the eval extra.")
    harness.add_argument("arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments (see orchard lm-eval --help)")

    export = commands.add_parser("export", help="write a checkpoint for other tools (transformers, llama.cpp)",
                                 description="Export a checkpoint as a Hugging Face directory that "
                                             "transformers loads with no custom code, or as a GGUF file for "
                                             "llama.cpp.")
    export.add_argument("checkpoint", help=CHECKPOINT_HELP)
    export.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf: a directory; gguf: one file")
    export.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    export.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                        help="GGUF tensor type (default f16); hf keeps the checkpoint's dtype")
    export.add_argument("--force", action="store_true", help=FORCE_HELP)

    quantize = commands.add_parser("quantize", help="int8/int4 weight-only quantization, for inference",
                                   description="Quantize the decoder's linear layers of a checkpoint to int8 "
                                               "(one scale per output row) or int4 (scale and zero per group "
                                               "of input columns) and write a new checkpoint that eval, "
                                               "generate and chat load as any other. Embeddings and norms stay "
                                               "as they are. A quantized checkpoint is not trained further.")
    quantize.add_argument("checkpoint", help=CHECKPOINT_HELP)
    quantize.add_argument("--bits", type=int, required=True, help="8 or 4")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="int4: input columns sharing a scale and zero, a power of two (default 32; "
                               "32, 64, 128 and 256 use PyTorch's fused CPU kernel)")
    quantize.add_argument("--minimize-error", action=argparse.BooleanOptionalAction, default=None,
                          help="int4: clip each group's range where that lowers its squared weight error (default off: "
                               "measured, it did not lower perplexity)")
    quantize.add_argument("--out", default=None,
                          help="output directory (default: beside the checkpoint, named NAME-int8 or NAME-int4-g32)")
    quantize.add_argument("--force", action="store_true", help=FORCE_HELP)
    quantize.add_argument("--device", default="auto", help="where to quantize: auto (a GPU when there is one), cpu, "
                                                           "cuda or cuda:N; the result is the same")

    grow = commands.add_parser("grow", formatter_class=HelpFormatter,
                               help="grow a model (layers, width, heads) without changing what it computes",
                               description="Write a larger copy of a checkpoint that computes the same function "
                                           "(the same logits; all but --depth-method stack), to train further: "
                                           "new blocks that add nothing until trained (LLaMA Pro), new MLP units "
                                           "or attention heads whose outputs are zero, new residual dimensions "
                                           "that stay zero. Width grows first, then depth. `orchard pretrain "
                                           "init=GROWN init_trainable=new` trains only the inserted blocks.",
                               epilog="example: orchard grow runs/pretrain --layers 8 --intermediate-size 1024")
    grow.add_argument("checkpoint", help=CHECKPOINT_HELP)
    grow.add_argument("--layers", type=int, default=None, help="number of blocks after growing")
    grow.add_argument("--hidden-size", type=int, default=None, help="width of the residual stream after growing")
    grow.add_argument("--intermediate-size", type=int, default=None, help="width of each MLP after growing")
    grow.add_argument("--heads", type=int, default=None,
                      help="query heads after growing (head_dim stays; under GQA, a multiple of the queries per "
                           "key/value head)")
    grow.add_argument("--kv-heads", type=int, default=None,
                      help="key/value heads after growing (default: keep the queries per key/value head)")
    grow.add_argument("--depth-method", choices=["identity", "stack"], default="identity",
                      help="identity: new blocks copy the one below with their outputs zeroed (same function; "
                           "default); stack: repeat the whole stack (G_stack; NOT the same function)")
    grow.add_argument("--positions", default=None, metavar="I,J,...",
                      help="identity: indices of the new blocks in the grown stack (default: one after every "
                           "L/n-th block)")
    grow.add_argument("--mlp-method", choices=["zero", "net2net"], default="zero",
                      help="zero: new units with zero output weights (default); net2net: copies of existing units "
                           "sharing their output weights")
    grow.add_argument("--seed", type=int, default=0, help="seed of the new weights' initialisation (default 0)")
    grow.add_argument("--out", default=None, help="output directory (default: beside the checkpoint, named NAME-grown)")
    grow.add_argument("--force", action="store_true", help=FORCE_HELP)

    info = commands.add_parser("info", help="config, parameter count and lineage of a checkpoint",
                               description="Show a checkpoint's architecture, size and family tree.")
    info.add_argument("checkpoint", help=CHECKPOINT_HELP)
    info.add_argument("--json", action="store_true", help="print JSON")

    lineage = commands.add_parser(
        "lineage", help="the family tree of a checkpoint: ancestors, descendants, cost, differences",
        description="orchard lineage CHECKPOINT: what it was made from and what was made from it, with each "
                    "one's stage, parameters, tokens, FLOPs, wall time and headline metric, from the catalog of "
                    "every checkpoint orchard wrote ($ORCHARD_HOME/catalog.sqlite). orchard lineage scan DIR ...: "
                    "add existing checkpoints. orchard lineage diff A B: their recipe, data and metric "
                    "differences.")
    lineage.add_argument("target", nargs="+", metavar="CHECKPOINT | scan DIR... | diff A B")
    lineage.add_argument("--cost", action="store_true",
                         help="the reuse ledger: its own compute, its ancestors', what it shared, what it saved "
                              "(only where measured)")
    lineage.add_argument("--plot", metavar="PNG", help="draw the family as a graph into this PNG file")
    lineage.add_argument("--steps", action="store_true", help="show intermediate step checkpoints too")
    lineage.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _options_first(argv: list[str], command: str, options: tuple[str, ...]) -> list[str]:
    """`command`'s `options` (each with its value) moved right after the command: argparse cannot
    read an option between a command's positionals (`orchard distill TEACHER --student S key=value`)."""
    if command not in argv:
        return argv
    at = argv.index(command) + 1
    head, rest, moved = argv[:at], [], []
    tail = argv[at:]
    while tail:
        item = tail.pop(0)
        if item in options and tail:
            moved += [item, tail.pop(0)]
        elif item.split("=", 1)[0] in options:
            moved.append(item)
        else:
            rest.append(item)
    return head + moved + rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _options_first(list(sys.argv[1:] if argv is None else argv), "distill", ("--student",))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args) or 0
    except OrchardError as error:
        if args.debug:
            raise
        print(f"orchard: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # The machine said no (a full disk, a read-only folder, a file in the way): not a bug in
        # orchard, and every write is atomic, so nothing half-written is left to clean up.
        if args.debug:
            raise
        from ..files import disk_error

        print(f"orchard: error: {disk_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\norchard: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130


def _dispatch(args) -> int | None:
    from . import commands

    if args.command in COMMANDS:
        return commands.train(args, COMMANDS[args.command])
    handler = {
        "quickstart": commands.quickstart, "tokenizer": commands.tokenizer_train,
        "generate": commands.generate, "chat": commands.chat, "serve": commands.serve, "eval": commands.evaluate,
        "lm-eval": commands.lm_eval,
        "info": commands.info, "lineage": commands.lineage, "export": commands.export, "quantize": commands.quantize, "grow": commands.grow,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
