"""What each `orchard` subcommand does, in terms of the library."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import OrchardError


def _duration(text: str):
    from ..config import Duration

    try:
        return Duration.parse(text)
    except ValueError as error:
        raise OrchardError(f"--max-time: {error}") from None


def quickstart(args) -> None:
    from .quickstart import run_quickstart, serve_commands

    report = run_quickstart(Path(args.out), max_time=_duration(args.max_time))
    print(f"report: {report}")
    print("serve the models (then open http://127.0.0.1:8000):")
    for command in serve_commands(Path(args.out)):
        print(f"  {command}")


def tokenizer_train(args) -> None:
    from ..data.corpus import iter_text_chunks
    from ..data.records import resolve_paths
    from ..files import atomic_directory, check_output, read_json, write_json
    from ..lineage import new_record
    from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer

    if args.vocab_size < MIN_VOCAB_SIZE:
        raise OrchardError(f"--vocab-size: must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), "
                           f"got {args.vocab_size}")
    paths = resolve_paths(args.data, key="--data")
    out = Path(args.out)
    recipe = {"data": [str(p.resolve()) for p in paths], "vocab_size": args.vocab_size, "text_field": args.text_field}

    def trained_here(target: Path) -> bool:
        record = read_json(target / "orchard.json")
        return record.get("stage") == "tokenizer" and record.get("recipe") == recipe

    # Before training, which can take long: a file in the way or someone else's folder is refused now.
    check_output(out, "--out", "tokenizer train", owned=trained_here, inputs=tuple(paths), force=args.force)
    tokenizer = Tokenizer.train((text for text, _ in iter_text_chunks(paths, args.text_field)),
                                vocab_size=args.vocab_size, show_progress=sys.stderr.isatty())

    def write(tmp: Path) -> None:
        tokenizer.save(tmp)
        write_json(tmp / "orchard.json", {**new_record("tokenizer", recipe, {"files": len(paths)}),
                                          "tokenizer_sha256": tokenizer.fingerprint()})

    atomic_directory(out, write)
    print(f"saved a {tokenizer.vocab_size}-token tokenizer to {out}")


def train(args, command) -> None:
    """Any training command (a `methods.registry.TrainingCommand`): load its config (recipe, then
    key=value overrides) and run it."""
    from ..config import load_config

    recipe, overrides = args.recipe, list(args.overrides)
    if command.name == "distill" and recipe and Path(recipe).is_dir():
        # `orchard distill TEACHER [RECIPE] ...`: the first argument is the teacher checkpoint.
        teacher = recipe
        recipe = overrides.pop(0) if overrides and "=" not in overrides[0] else None
        overrides = [f"teacher={teacher}"] + overrides
    if getattr(args, "student", None):
        overrides.append(f"student={args.student}")
    if recipe and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe] + overrides  # no recipe, only overrides
    from ..training.distributed import leave_process_group

    result = command.run(load_config(command.config, recipe, overrides))
    leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (rank 0 holds the metrics)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.state.metrics.items())
        print(f"{result.final_dir}: {result.state.step} steps, {result.state.tokens:,} tokens; {metrics}")


def generate(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..model.generation import generate_text
    from ..training.runtime import Runtime

    sampling = _sampling_config(args)
    runtime = Runtime.for_inference(args.device, args.precision)
    checkpoint = load_checkpoint(args.checkpoint, device=runtime.device, dtype=runtime.inference_dtype)
    if args.adapter:
        _generate_with_adapters(checkpoint, args, sampling, runtime)
        return
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1}")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        try:
            with runtime.autocast():
                generate_text(checkpoint.model, checkpoint.tokenizer, [args.prompt], sampling, on_text=show)
        except ValueError as error:
            raise OrchardError(str(error)) from None
        sys.stdout.write("\n")
        if sampling.seed is not None:
            sampling.seed += 1


def _generate_with_adapters(checkpoint, args, sampling, runtime) -> None:
    """Several adapters on one base, in one batch: row i of the batch uses adapter i."""
    from ..checkpoint import attach_adapter_checkpoint
    from ..model.generation import generate_text
    from ..peft.lora import adapter_routing

    names = []
    for spec in args.adapter:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).name
        attach_adapter_checkpoint(checkpoint.model, checkpoint.path, path, name)
        names.append(name)
    checkpoint.model.to(runtime.device)  # the attached adapters too
    with adapter_routing(checkpoint.model, names), runtime.autocast():
        try:
            outputs = generate_text(checkpoint.model, checkpoint.tokenizer, [args.prompt] * len(names), sampling)
        except ValueError as error:
            raise OrchardError(str(error)) from None
    for name, output in zip(names, outputs):
        print(f"--- {name}\n{args.prompt}{output}")


def chat_end_ids(checkpoint_dir: Path, tokenizer) -> list[int]:
    """Tokens that end an assistant turn: generation_config.json's eos ids (Llama 3 lists
    <|eot_id|> there) and the ChatML turn end."""
    ids = set()
    config_file = checkpoint_dir / "generation_config.json"
    if config_file.is_file():
        try:
            eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as error:
            raise OrchardError(f"{config_file}: invalid JSON ({error})") from None
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    for token in ("<|im_end|>", "<|eot_id|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids.add(token_id)
    return sorted(ids)


def chat(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..model.generation import generate_text
    from ..training.runtime import Runtime

    sampling = _sampling_config(args)
    runtime = Runtime.for_inference(args.device, args.precision)
    checkpoint = load_checkpoint(args.checkpoint, device=runtime.device, dtype=runtime.inference_dtype)
    tokenizer = checkpoint.tokenizer
    turn_end = chat_end_ids(checkpoint.path, tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat with the model: /reset clears the conversation, /quit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sys.stdout.write("model> ")
        sys.stdout.flush()
        try:
            with runtime.autocast():
                (reply,) = generate_text(checkpoint.model, tokenizer, [prompt], sampling, end_token_ids=turn_end,
                                         add_bos=False,  # the chat template writes any BOS itself
                                         on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        except ValueError as error:
            # The conversation outgrew the context: start afresh rather than die.
            print(f"\n({error}; conversation reset)")
            messages = list(system)
            continue
        print()
        messages.append({"role": "assistant", "content": reply.strip()})


def serve(args) -> None:
    try:
        import uvicorn

        from ..lineage import checkpoint_name
        from ..serve.api import ServedModels, create_app
        from ..serve.engine import Engine
    except ImportError as error:
        raise OrchardError(f"orchard serve needs the serve extra ({error.name} is missing): "
                           f"pip install 'orchard-lm[serve]'") from None
    from ..checkpoint import attach_adapter_checkpoint, load_checkpoint
    from ..peft.lora import active_adapter
    from ..training.runtime import Runtime

    for name, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue),
                        ("--max-model-len", args.max_model_len or 1)):
        if value < 1:
            raise OrchardError(f"{name} must be at least 1, got {value}")
    if not args.request_timeout > 0:
        raise OrchardError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    runtime = Runtime.for_inference(args.device, args.precision)
    checkpoint = load_checkpoint(args.checkpoint, device=runtime.device, dtype=runtime.inference_dtype)
    own_adapter = active_adapter(checkpoint.model)  # an adapter checkpoint's model id answers with its adapter
    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise OrchardError(f"--adapter {spec!r}: expected NAME=PATH")
        attach_adapter_checkpoint(checkpoint.model, checkpoint.path, path, name)
        adapters.append(name)
    checkpoint.model.to(runtime.device)
    base = args.model_name or checkpoint_name(checkpoint.path)
    if base in adapters:
        raise OrchardError(f"--adapter {base}: the base model is already called {base!r} (see --model-name)")
    engine = Engine(checkpoint.model, checkpoint.tokenizer, args.max_batch_size, args.max_queue, args.max_model_len,
                    autocast=runtime.autocast, default_adapter=own_adapter)
    models = ServedModels(base, adapters, chat_end_ids(checkpoint.path, checkpoint.tokenizer))
    app = create_app(engine, models, api_key=args.api_key or os.environ.get("ORCHARD_API_KEY") or None,
                     request_timeout=args.request_timeout, start_engine=False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    # HTTP on a thread, the model on the main thread (see `Engine.run`). SIGTERM and Ctrl-C tell
    # uvicorn to stop taking connections and let the open ones finish; its shutdown then stops the
    # engine once the queue has drained, `run` returns, and the command exits with status 0.
    http = threading.Thread(target=server.run, name="orchard-http")

    def shut_down(*_):
        server.should_exit = True

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, shut_down)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise OrchardError(f"could not serve on {args.host}:{args.port} (see the message above)")
        time.sleep(0.05)
    print(f"orchard: serving {base}{' with ' + ', '.join(adapters) if adapters else ''} on "
          f"http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr, flush=True)
    engine.run()
    http.join()


def evaluate(args) -> None:
    from ..evaluation.compare import evaluate_checkpoints
    from ..evaluation.subject import EvalOptions
    from ..evaluation.tasks import BitsPerByte, parse_tasks
    from ..training.runtime import Runtime

    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value <= 0:
            raise OrchardError(f"{flag}: must be positive, got {value}")
    if args.shots < 0 or args.temperature < 0:
        raise OrchardError(f"--{'shots' if args.shots < 0 else 'temperature'}: must not be negative")
    if not args.tasks and not args.data:
        raise OrchardError("orchard eval: name what to evaluate with --tasks (or a corpus with --data)")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.is_dir() and any(out.iterdir()) and not (out / "eval.json").is_file():
        raise OrchardError(f"--out: {out} holds files that are not an evaluation's; name a new or empty directory")
    # Tasks read and check their files before any model loads.
    tasks = parse_tasks(args.tasks or "", text_field=args.text_field) if args.tasks else []
    if args.data:
        tasks.insert(0, BitsPerByte(args.data, name="bpb", text_field=args.text_field, key="--data"))
    options = EvalOptions(limit=args.limit, batch_size=args.batch_size, shots=args.shots, samples=args.samples,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens, seq_len=args.seq_len,
                          seed=args.seed, judge=args.judge, reference=args.reference, judge_mode=args.judge_mode,
                          chat={"auto": None, "chat": True, "base": False}[args.format])
    runtime = Runtime.for_inference(args.device, args.precision)
    comparison = evaluate_checkpoints(args.checkpoint, tasks, options, runtime)
    if out is not None:
        for path in comparison.write(out):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(comparison.to_json(), ensure_ascii=False))
    else:
        print(comparison.markdown(), end="")


def lm_eval(args) -> int:
    try:
        from ..evaluation.harness import run_lm_eval_cli
    except ImportError as error:
        raise OrchardError(f"orchard lm-eval needs the eval extra ({error.name} is missing): "
                           "pip install 'orchard-lm[eval]'") from None
    return run_lm_eval_cli(args.arguments)


def lineage(args) -> None:
    from contextlib import closing

    from ..lineage.catalog import catalog_file, connect, scan
    from ..lineage.family import Family, format_cost, plot_family

    action, rest = args.target[0], args.target[1:]
    if action == "scan" and not Path(action).exists():
        if not rest:
            raise OrchardError("orchard lineage scan: name the directories to scan")
        found = scan(rest)
        print(f"{len(found)} checkpoints catalogued in {catalog_file()}")
        return
    with closing(connect()) as connection:
        family = Family(connection)
        if action == "diff" and not Path(action).exists():
            if len(rest) != 2:
                raise OrchardError("orchard lineage diff: name two checkpoints")
            differences = family.diff(family.find(rest[0]), family.find(rest[1]))
            if args.json:
                print(json.dumps(differences, default=str))
                return
            for section, changed in differences.items():
                print(f"{section}:")
                for key, (left, right) in changed.items():
                    print(f"  {key}: {left!r} -> {right!r}")
            if not differences:
                print("no differences in stage, recipe, data, parameters, training or metrics")
            return
        if rest:
            raise OrchardError(f"orchard lineage: one checkpoint at a time (got {len(args.target)}); "
                               "`orchard lineage diff A B` compares two")
        identity = family.find(action)
        if args.plot:
            print(f"wrote {plot_family(family, identity, Path(args.plot), args.steps)}", file=sys.stderr)
        if args.cost:
            ledger = family.cost(identity)
            print(json.dumps(ledger) if args.json else format_cost(ledger))
        elif args.json:
            print(json.dumps(family.to_json(identity, args.steps)))
        else:
            print(family.render(identity, args.steps))


def export(args) -> None:
    from ..checkpoint import inference_only_error, is_quantized_checkpoint, resolve_checkpoint

    source = resolve_checkpoint(args.checkpoint)
    if is_quantized_checkpoint(source):
        raise inference_only_error(source, "export")
    if args.format == "hf":
        from ..interop.export import export_hf

        written = export_hf(source, Path(args.out), force=args.force)
    else:
        from ..interop.gguf import export_gguf

        written = export_gguf(source, Path(args.out), args.dtype, force=args.force)
    print(f"wrote {written}")


def quantize(args) -> None:
    from ..checkpoint.quantize import quantize_checkpoint
    from ..training.runtime import Runtime

    runtime = Runtime.for_inference(args.device)
    result = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size, args.minimize_error,
                                 force=args.force, device=runtime.device)
    print(result.summary())


def grow(args) -> None:
    from ..checkpoint.grow import grow_checkpoint

    result = grow_checkpoint(args.checkpoint, args.out, layers=args.layers, hidden_size=args.hidden_size,
                             intermediate_size=args.intermediate_size, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, depth_method=args.depth_method,
                             positions=_positions(args.positions), mlp_method=args.mlp_method, seed=args.seed,
                             force=args.force)
    print(result.summary())


def _positions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise OrchardError(f"--positions: expected comma-separated block indices such as 2,5, got {text!r}") from None


def info(args) -> None:
    from ..checkpoint import read_model_config, read_quantization, resolve_checkpoint
    from ..lineage import ancestry, total_flops

    path = resolve_checkpoint(args.checkpoint)
    chain = ancestry(path)
    # An adapter checkpoint's architecture is its base's.
    base = next((Path(r["path"]) for r in chain if (Path(r["path"]) / "config.json").is_file()), None)
    if base is None:
        parent = (chain[0].get("parent") or {}).get("path")
        raise OrchardError(f"{path}: adapter checkpoint whose base model {parent!r} is not available")
    config = read_model_config(base)
    summary = {
        "checkpoint": str(path),
        "config": config.to_hf_dict(),
        "parameters": config.num_parameters(),
        "non_embedding_parameters": config.num_parameters(include_embeddings=False),
        "lineage": chain,
        "total_training_flops": total_flops(chain),
    }
    quantization = read_quantization(path)
    if quantization is not None:
        summary["quantization"] = quantization
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print(f"{path}")
    print(f"  {config.to_hf_dict()['model_type']}: {summary['parameters']:,} parameters "
          f"({summary['non_embedding_parameters']:,} without embeddings)")
    print(f"  {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"{config.num_attention_heads} heads ({config.num_key_value_heads} key/value), vocab {config.vocab_size}, "
          f"rope theta {config.rope_theta:g}, {'tied' if config.tie_word_embeddings else 'untied'} embeddings")
    if quantization is not None:
        group = f", groups of {quantization.get('group_size')}" if quantization.get("bits") == 4 else ""
        print(f"  quantized: int{quantization.get('bits')}{group}, {len(quantization.get('modules') or [])} of "
              f"{7 * config.num_hidden_layers} linear layers ({quantization.get('scheme')})")
    print("  lineage (newest first):")
    for depth, record in enumerate(chain):
        training = record.get("training", {})
        cost = (f"{training.get('steps', 0)} steps, {training.get('tokens', 0):,} tokens, "
                f"{training.get('flops', 0):.3g} FLOPs, {training.get('wall_seconds', 0):.0f}s") if training else ""
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.get("metrics", {}).items()
                            if isinstance(v, (int, float)) and k.startswith("val_") and not k.endswith("_tokens"))
        print(f"  {'  ' * depth}- {record.get('stage')}: {record['path']}" + (f" ({cost})" if cost else ""))
        if metrics:
            print(f"  {'  ' * depth}  {metrics}")
    if len(chain) > 1:
        own = chain[0].get("training", {}).get("flops", 0.0)
        print(f"  compute: {own:.3g} FLOPs in this stage, {summary['total_training_flops']:.3g} including ancestors")


def _sampling_config(args):
    from ..model.generation import SamplingConfig

    try:
        return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                              seed=args.seed, compile=args.compile)
    except ValueError as error:
        raise OrchardError(f"--{str(error).split()[0].replace('_', '-')}: {error}") from None
