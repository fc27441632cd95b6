"""Model cards: the README.md that every checkpoint and Hugging Face export carries, rendered from its
lineage record, so that the Hub, and whoever opens the folder, sees what the model is, where it came
from, what it cost and how to load it.

The front matter is the Hub's model card metadata (`huggingface_hub.ModelCardData`), decided so:

- `library_name`: transformers for whole weights; peft for an adapter checkpoint that holds its
  adapter in PEFT's format too (`peft/`, plain LoRA); none for what only orchard loads (other
  adapters, quantized checkpoints, a sharded run's step checkpoints). `pipeline_tag`:
  text-generation, or text-classification for a reward model (a score head).
- `base_model`: the parent, by its Hub id when it is a snapshot in the Hugging Face cache (how a
  model loaded as `hf:ORG/NAME` is recorded), else by its path as recorded; absent for a model
  trained from scratch. `base_model_relation`:
  adapter: an adapter checkpoint (the base stays where it is);
  merge: a stage that trained adapters but whose weights are whole, which is an export that merged
    the adapter into its base: that base is the base_model;
  quantized: `orchard quantize`;
  finetune: every other stage trained from a parent (sft, dpo, grpo, ppo, reward, continual,
    pretrain from init=), and grow: the Hub has no relation for a model enlarged from another, and
    the grown weights are the parent's, made to be trained further, which is closest to a fine-tune.
  Distillation: a student built fresh (student=CONFIG) learns the teacher's outputs, not its
  weights, so it has no base_model; the teacher is named in a tag and in the body. A student that
  continues a checkpoint (student=CKPT) is a fine-tune of it; one built from the teacher's layers
  (student_layers=) a fine-tune of the teacher.
- `license`: apache-2.0, orchard's own, when the stages of the lineage trained on orchard's built-in
  synthetic world and nothing else; otherwise none. A model's license follows its data and its
  base's, and orchard knows neither the license of a user's files nor that of a Hub model.
- `datasets`: the files this stage trained on, as recorded. The built-in world is generated from a
  seed, not a dataset one could fetch: the body and the model-index name it instead.
- `tags`: orchard, the stage and its methods (sft, lora, dpo, simpo, int8, distillation, ...).
- `model-index`: one result per held-out metric of the record (`val_*`), on the stage's own
  validation split.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData

from ..checkpoint.layout import PEFT_DIR, is_adapter_checkpoint, is_checkpoint, is_quantized_checkpoint
from ..hub import snapshot_repo_id
from ..model import ModelConfig
# The module rather than its names: `checkpoint.save` imports this module, and when `orchard.lineage`
# is imported first, `record` is at that moment still importing the checkpoint package.
from . import record as lineage
from .stages import trains_adapters

CARD_FILE = "README.md"

# What a checkpoint directory holds (`weights_kind`).
FULL, ADAPTER, PEFT_ADAPTER, QUANTIZED, SHARDS = "full", "adapter", "peft-adapter", "quantized", "shards"


# The recipe keys worth a line in the card, by a stage's first word.
RECIPE_HIGHLIGHTS = {
    "pretrain": ("init",),
    "dpo": ("loss", "beta"),
    "grpo": ("rewards", "num_generations", "beta"),
    "ppo": ("rewards", "kl_coef"),
    "reward": ("margin",),
    "continual": ("strategy", "tasks"),
    "distill": ("mode", "divergence", "temperature", "alpha", "top_k", "student_layers"),
    "quantize": ("bits", "group_size", "scheme"),
    "grow": ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "depth_method", "mlp_method"),
}

FRONT_MATTER_ORDER = ("library_name", "pipeline_tag", "base_model", "base_model_relation", "license", "datasets",
                      "tags", "model-index")

# Held-out counts rather than measures of the model.
NOT_METRICS = ("val_tokens",)

# Metric names spelled out where a record abbreviates them.
METRIC_NAMES = {"bpb": "bits per byte", "jsd": "Jensen-Shannon divergence", "forward_kl": "forward KL",
                "reverse_kl": "reverse KL"}


def write_model_card(directory: Path, path: str | Path, config: ModelConfig) -> None:
    """README.md into `directory`, a checkpoint being written whose orchard.json and weights are
    already there and which will then be renamed to `path`."""
    chain = lineage.ancestry(directory)
    chain[0]["path"] = str(Path(path).resolve())
    (Path(directory) / CARD_FILE).write_text(render_model_card(chain, config, weights_kind(Path(directory))),
                                             encoding="utf-8")


def weights_kind(directory: Path) -> str:
    if is_adapter_checkpoint(directory):
        return PEFT_ADAPTER if (directory / PEFT_DIR).is_dir() else ADAPTER
    if is_quantized_checkpoint(directory):
        return QUANTIZED
    return FULL if is_checkpoint(directory) else SHARDS


def render_model_card(chain: list[dict], config: ModelConfig, weights: str) -> str:
    """The card (YAML front matter, then Markdown) of the checkpoint whose record, with its `path`, is
    `chain[0]`, its ancestors' following as `ancestry` gives them; `weights` is `weights_kind`'s."""
    record = chain[0]
    name = lineage.checkpoint_name(Path(record["path"]))
    base, relation = base_model(record, weights)
    metrics = held_out_metrics(record)
    dataset_type, dataset_name = dataset_identity(record)
    results = [EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
                          dataset_split="validation", metric_type=key.removeprefix("val_"), metric_value=value,
                          metric_name=f"validation {_metric_name(key)}") for key, value in metrics.items()]
    data = ModelCardData(
        library_name={FULL: "transformers", PEFT_ADAPTER: "peft"}.get(weights),
        pipeline_tag="text-classification" if config.num_labels else "text-generation",
        base_model=model_id(base) if base else None,
        license="apache-2.0" if trained_only_on_builtin_data(chain) else None,
        datasets=data_files(record) or None,
        tags=tags(record),
        # An empty model-index does not load back: none at all without metrics.
        eval_results=results or None,
        model_name=name if results else None,
        base_model_relation=relation,
    )
    fields = data.to_dict()
    # base_model_relation beside base_model rather than after everything ModelCardData knows.
    ordered = {key: fields.pop(key) for key in FRONT_MATTER_ORDER if key in fields} | fields
    front = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True).strip()
    sections = [_summary(record, config, weights, name, base, relation), _recipe(record),
                _metrics_table(metrics), _lineage(chain), _cost(chain), _loading(record, config, weights)]
    return f"---\n{front}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def model_id(path: str) -> str:
    """How the front matter names a model: its Hub id, else its path."""
    return snapshot_repo_id(path) or path


def base_model(record: dict, weights: str) -> tuple[str | None, str | None]:
    """(the base model's path as recorded, base_model_relation), or (None, None) for a model trained
    from scratch; the rules are the module docstring's."""
    stage = str(record.get("stage", ""))
    parent = (record.get("parent") or {}).get("path")
    if stage.startswith("distill"):
        if record.get("student_init"):
            return str(record["student_init"]), "finetune"
        if parent and (record.get("recipe") or {}).get("student_layers"):
            return parent, "finetune"
        return None, None
    if not parent:
        return None, None
    if stage == "quantize":
        return parent, "quantized"
    if trains_adapters(stage):
        return parent, "merge" if weights == FULL else "adapter"
    return parent, "finetune"


def held_out_metrics(record: dict) -> dict[str, float]:
    """The record's final metrics measured on held-out data, by their record key."""
    return {key: value for key, value in (record.get("metrics") or {}).items()
            if key.startswith("val_") and key not in NOT_METRICS and isinstance(value, (int, float))}


def _metric_name(key: str) -> str:
    short = key.removeprefix("val_")
    return METRIC_NAMES.get(short, short.replace("_", " "))


def trained_on_builtin_data(record: dict) -> bool | None:
    """Whether the stage trained on the built-in world alone; None for a stage with no data of its own
    (quantize, grow, a hand-made record)."""
    data = record.get("data") or {}
    if isinstance(data.get("source"), str):  # conversations, pairs, prompts, continual tasks
        return data["source"].startswith("built-in")
    if data.get("paths"):  # a corpus (pretrain, distill): the built-in world when the recipe names none
        return ((record.get("recipe") or {}).get("data") or {}).get("path") is None
    return None if not data else False


def trained_only_on_builtin_data(chain: list[dict]) -> bool:
    """Whether a lineage whose every record could be read trained on the built-in world, and on
    nothing else."""
    if any(entry.get("missing_record") for entry in chain):
        return False
    seen = [trained_on_builtin_data(entry) for entry in chain]
    return True in seen and False not in seen


def data_files(record: dict) -> list[str]:
    """The files this stage trained on, as recorded (none for the built-in world)."""
    if trained_on_builtin_data(record) is not False:
        return []
    data = record.get("data") or {}
    if data.get("paths"):
        return [str(p) for p in data["paths"]]
    configured = ((record.get("recipe") or {}).get("data") or {}).get("path")
    if isinstance(configured, list):  # `source` would be the list's repr
        return [str(p) for p in configured]
    return [str(data["source"])] if data.get("source") else []


def dataset_identity(record: dict) -> tuple[str, str]:
    """(type, name) of the data the stage's held-out metrics were measured on, for the model-index."""
    if trained_on_builtin_data(record):
        source = (record.get("data") or {}).get("source")
        return "orchard-built-in-world", f"orchard's {source or 'built-in synthetic world'}"
    files = ", ".join(data_files(record)) or "unrecorded"
    return files, files


def tags(record: dict) -> list[str]:
    stage = str(record.get("stage", "unknown"))
    recipe = record.get("recipe") or {}
    found = ["orchard", stage]
    if trains_adapters(stage):
        method, _, adapter = stage.rpartition("-")
        found += [method, adapter]
    if isinstance(recipe.get("loss"), str):
        found.append(recipe["loss"])  # dpo, ipo, simpo, orpo, ...
    if stage.startswith("distill"):
        found.append("distillation")
        teacher = (record.get("parent") or {}).get("path")
        if teacher:
            found.append(f"teacher:{snapshot_repo_id(teacher) or lineage.checkpoint_name(Path(teacher))}")
    if stage == "quantize" and recipe.get("bits"):
        found.append(f"int{recipe['bits']}")
    if record.get("export"):
        found.append("merged" if trains_adapters(stage) else "export")
    return list(dict.fromkeys(found))


def _label(path: str) -> str:
    """A model in the body's prose: `hf:ORG/NAME` or its path."""
    hub = snapshot_repo_id(path)
    return f"`hf:{hub}`" if hub else f"`{path}`"


def _summary(record: dict, config: ModelConfig, weights: str, name: str, base: str | None,
             relation: str | None) -> str:
    stage = str(record.get("stage", "unknown"))
    parent = (record.get("parent") or {}).get("path")
    if stage.startswith("distill") and parent:
        origin = f"Distilled from the teacher {_label(parent)}"
        origin += f", starting from {_label(base)}." if base else ", the student trained from scratch."
    elif relation is None:
        origin = "Trained from scratch."
    else:
        origin = {"finetune": "Trained further from", "adapter": "An adapter trained on the frozen base",
                  "merge": "An adapter merged into its base", "quantized": "A quantized copy of"}[relation]
        origin += f" {_label(base)}."
    source = (record.get("export") or {}).get("source") or {}
    if source.get("path"):
        origin += f" Exported for transformers from `{source['path']}`."
    parameters = record.get("parameters") or {}
    # A merged adapter's record counts the adapter's parameters, which merging folded into the base's.
    total = parameters.get("total")
    if relation == "merge" or not isinstance(total, int):
        total = config.num_parameters()
    counted = f"{total:,} total"
    if isinstance(parameters.get("trainable"), int):
        counted += f", {parameters['trainable']:,} trained in this stage"
    held = {FULL: "whole weights (safetensors)", ADAPTER: "the adapter only; the base stays where it is",
            PEFT_ADAPTER: "the adapter only (also in PEFT's format); the base stays where it is",
            QUANTIZED: "int8/int4 codes of the decoder's linear layers (orchard's format, for inference)",
            SHARDS: "a sharded run's shards, which only resuming the run reads"}[weights]
    architecture = (f"{config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                    f"MLP {config.intermediate_size}, {config.num_attention_heads} heads "
                    f"({config.num_key_value_heads} key/value), vocabulary {config.vocab_size}, "
                    f"context {config.max_position_embeddings}, "
                    f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings")
    rows = [("Stage", f"`{stage}`"), ("Architecture", architecture), ("Parameters", counted), ("Weights", held)]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"# {name}\n\nA causal language model made with orchard. {origin}\n\n{table}"


def _recipe(record: dict) -> str:
    stage = str(record.get("stage", "unknown"))
    recipe = record.get("recipe") or {}
    training = record.get("training") or {}
    lines = []
    highlights = [f"{key}={recipe[key]}" for key in RECIPE_HIGHLIGHTS.get(stage.split("-")[0], ())
                  if recipe.get(key) is not None]
    if highlights:
        lines.append("- Recipe: " + ", ".join(highlights))
    peft = recipe.get("peft") or {}
    if trains_adapters(stage) and peft:
        lines.append(f"- Adapter: {peft.get('method')}, r={peft.get('r')}, alpha={peft.get('alpha')}, "
                     f"targets {', '.join(map(str, peft.get('target_modules') or []))}")
    lines.append(f"- Data: {_data_description(record)}")
    if training:
        processes = training.get("world_size") or 1
        lines.append(f"- Training: {training.get('steps', 0):,} steps, {training.get('tokens', 0):,} tokens, "
                     f"global batch {training.get('global_batch')}, learning rate "
                     f"{(recipe.get('train') or {}).get('lr')}, {training.get('precision')} on "
                     f"{training.get('device')}" + (f" x{processes} processes" if processes > 1 else ""))
    else:
        lines.append("- Training: none of its own (made from its parent's weights)")
    for key in ("grew", "new_layers", "function_preserving"):
        if key in record:
            lines.append(f"- {key.replace('_', ' ').capitalize()}: {record[key]}")
    return "## How it was made\n\n" + "\n".join(lines)


def _data_description(record: dict) -> str:
    data = record.get("data") or {}
    builtin = trained_on_builtin_data(record)
    if builtin is None:
        return "none of its own"
    if builtin and data.get("paths"):
        configured = (record.get("recipe") or {}).get("data") or {}
        what = (f"orchard's built-in synthetic world ({configured.get('synthetic_documents')} documents, "
                f"seed {configured.get('synthetic_seed')})")
    elif builtin:
        what = f"orchard's {data['source']}"
    else:
        what = ", ".join(f"`{f}`" for f in data_files(record))
    if isinstance(data.get("tokens"), int):
        what += f", {data['tokens']:,} tokens"
    elif isinstance(data.get("supervised_tokens"), int):
        what += f", {data['supervised_tokens']:,} supervised tokens"
    return what


def _metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return ""
    rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in metrics.items())
    return f"## Evaluation\n\nFinal metrics on the stage's held-out split:\n\n| metric | value |\n|---|---|\n{rows}"


def _lineage(chain: list[dict]) -> str:
    lines = []
    for depth, entry in enumerate(chain):
        path = str(entry.get("path"))
        label = f"this model, `{path}`" if depth == 0 else _label(path)
        if depth and str(chain[depth - 1].get("stage", "")).startswith("distill"):
            label += " (the teacher)"
        if entry.get("missing_record"):
            why = "a Hugging Face Hub model" if snapshot_repo_id(path) else f"{entry.get('stage')}: no lineage record to follow"
            lines.append(f"{depth + 1}. {label} ({why})")
        else:
            flops = (entry.get("training") or {}).get("flops")
            lines.append(f"{depth + 1}. {label}: `{entry.get('stage')}`" + (f", {flops:.3g} FLOPs" if flops else ""))
    return "## Lineage\n\nNewest first, each made from the next:\n\n" + "\n".join(lines)


def _cost(chain: list[dict]) -> str:
    training = chain[0].get("training") or {}
    own = (f"{training.get('flops', 0):.3g} FLOPs, {training.get('wall_seconds', 0):,.0f} s of wall time, "
           f"{training.get('tokens', 0):,} tokens" if training else "no training of its own")
    uncounted = " (a model without an orchard record is not counted)" if chain[-1].get("missing_record") else ""
    return (f"## Cost\n\n- This stage: {own}\n- Its ancestors: {lineage.total_flops(chain[1:]):.3g} FLOPs{uncounted}\n"
            f"- In all: {lineage.total_flops(chain):.3g} training FLOPs")


def _loading(record: dict, config: ModelConfig, weights: str) -> str:
    path = record["path"]
    orchard = f"```bash\norchard generate {path} --prompt \"Hello\"\norchard chat {path}\norchard info {path}\n```"
    if weights == SHARDS:
        return ("## How to load\n\nA step checkpoint of a sharded run: running the run's command again resumes "
                "from it; its final/ checkpoint is the one to load.")
    if weights == QUANTIZED:
        return ("## How to load\n\nWith orchard (transformers would load it with the quantized layers "
                f"missing):\n\n{orchard}")
    if weights in (ADAPTER, PEFT_ADAPTER):
        text = (f"## How to load\n\nWith orchard, which finds the base in the lineage record:\n\n{orchard}\n\n"
                f"Merged into its base, as a plain transformers model: `orchard export {path} --format hf --out DIR`.")
        if weights == PEFT_ADAPTER:
            base = model_id((record.get("parent") or {}).get("path") or "BASE")
            text += (f"\n\nWith peft:\n\n```python\nfrom peft import PeftModel\n"
                     f"from transformers import AutoModelForCausalLM\n\n"
                     f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                     f"model = PeftModel.from_pretrained(base, \"{path}/{PEFT_DIR}\")\n```")
        return text
    auto = "AutoModelForSequenceClassification" if config.num_labels else "AutoModelForCausalLM"
    return (f"## How to load\n\nWith transformers:\n\n```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
            f"model = {auto}.from_pretrained(\"{path}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
            f"```\n\nWith orchard:\n\n{orchard}")
