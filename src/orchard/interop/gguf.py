"""Export a checkpoint as one GGUF file for llama.cpp (and what builds on it: ollama, LM Studio, ...).

The file is what llama.cpp's own `convert_hf_to_gguf.py` writes for the checkpoint's `config.json`:

* `attention_bias=False` (config says `LlamaForCausalLM`): architecture `llama`. GGML's rope for
  llama is the interleaved ("NORM") kind, rotating pairs (x0, x1), (x2, x3), ..., while Hugging
  Face's (and orchard's) rotates the two halves of each head, (x_i, x_{i + D/2}). Like
  `LlamaModel.permute` in the converter, the rows of every head of `q_proj` and `k_proj` are
  reordered so that the interleaved rotation of the permuted weights equals the half-split rotation
  of the originals: reshape(n_head, 2, D/2, in).swapaxes(1, 2), with n_head query heads for q and
  key/value heads for k.
* `attention_bias=True` (config says `Qwen2ForCausalLM`): architecture `qwen2`, with the q/k/v bias
  tensors. llama.cpp runs qwen2 with the half-split ("NEOX") rope, so nothing is permuted, as in
  the converter's `Qwen2Model`. llama.cpp's qwen2 needs heads * head_dim == hidden_size; a model
  with another head_dim is refused with an OrchardError.

Tensor types follow the converter too: 1-D tensors and norms are always F32; the 2-D weights are
F32, F16 or Q8_0 as asked, and a weight whose rows are not a multiple of Q8_0's 32-value block falls
back to F16. A tied `lm_head` is not written: llama.cpp uses `token_embd.weight` when
`output.weight` is absent.

Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the vocabulary in id order as the
byte-level strings of tokenizer.json (padded with unused `[PAD<i>]` entries up to the model's
vocab_size), special tokens typed CONTROL, the merges, the bos/eos/padding ids, the chat template,
and `add_bos_token = false` (orchard never prepends <|begin_of_text|> on its own).

Pre-tokenizer, `tokenizer.ggml.pre = "qwen2"`: orchard splits text with Llama 3's regex (numbers in
runs of up to three digits, `\\p{N}{1,3}`) and then splits every numeric character apart
(`Digits(individual_digits=True)`). llama.cpp has no "Llama 3 plus single digits" pre-tokenizer, but
its "qwen2" one is Llama 3's regex with `\\p{N}` (one numeric character) in place of `\\p{N}{1,3}`,
which cuts text into the same pieces: digits only ever match that alternative, so every other match
starts at the same place. Like orchard's BPE (and unlike "llama-bpe"), "qwen2" does not look a
whole word up in the vocabulary before merging (`ignore_merges`) and does not clean up spaces when
decoding. Residual mismatch risk: llama.cpp classifies characters (letter, number, whitespace) with
its own Unicode tables and the Rust `tokenizers` library with Rust's, so a rare or recently assigned
code point may be split differently; and orchard's case-insensitive contractions `(?i:'s|...)` also
match Unicode case variants such as `'ſ` (long s) that llama.cpp's `'[sS]` does not. Text outside
those corners tokenizes identically (tested against llama-cpp-python where it is installed).
The export checks the tokenizer really splits text that way (and names a plain Llama 3 split
"llama-bpe"), refusing any other pre-tokenizer rather than writing a file llama.cpp would misread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import load_merged, loaded_paths, model_state_dict, resolve_checkpoint
from ..errors import OrchardError
from ..files import check_output, remove_stale_temporaries, temporary_path
from .export import export_note, same_export

DTYPES = ("f32", "f16", "q8_0")

# Llama 3's split regex (as in its tokenizer.json and orchard's tokenizer).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Text that tells pre-tokenizers apart (the idea of llama.cpp's `get_vocab_base_pre`): runs of
# whitespace and newlines, numbers of every length, contractions in both cases, punctuation runs,
# several scripts, emoji sequences.
_PROBE = ("\n \n\n \t\t \t\n  \n   x  y\r\n 🚀 (ok) 😶\u200d🌫️ ✅🦙🦙 3 33 333 3333 33333 1234567 3.3 3..3 "
          "ឡូត 我想在apple工作1314151天～ ------=== нещо на Български '''```\"\"......!!!??? I've "
          "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you? We'Ve a'lL ½ ２０２４")


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: reorder each head's rows from half-split rope order to
    interleaved order (works for weights (n_head * D, in) and biases (n_head * D,))."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _model_name(path: Path) -> str:
    # A run's `final/` or `step-N/` is better named after the run.
    if path.name == "final" or path.name.startswith("step-"):
        return path.parent.name or path.name
    return path.name


def _pre_tokenizer_name(backend) -> str | None:
    """The llama.cpp pre-tokenizer that splits text as `backend` does, or None if neither
    candidate does (orchard's split: "qwen2"; plain Llama 3: "llama-bpe")."""
    from tokenizers import Regex, pre_tokenizers

    if backend.normalizer is not None or backend.pre_tokenizer is None:
        return None
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_PROBE)]
    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    candidates = {
        "qwen2": pre_tokenizers.Sequence([split, pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([split, byte_level]),
    }
    for name, candidate in candidates.items():
        if [piece for piece, _ in candidate.pre_tokenize_str(_PROBE)] == pieces:
            return name
    return None


def _vocabulary(tokenizer_file: Path, vocab_size: int, gguf) -> tuple[str, list[str], list[int], list[str]]:
    """The pre-tokenizer's llama.cpp name, the tokens and token types in id order, and the merges,
    as `get_vocab_base` and `SpecialVocab` in llama.cpp's converter read them."""
    from tokenizers import Tokenizer as HFTokenizer

    # load_checkpoint has already parsed this file (Tokenizer.load), so reading it again succeeds.
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    backend = HFTokenizer.from_file(str(tokenizer_file))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise OrchardError(f"{tokenizer_file}: GGUF export supports byte-level BPE tokenizers only")
    pre = _pre_tokenizer_name(backend)
    if pre is None:
        raise OrchardError(f"{tokenizer_file}: its pre-tokenizer splits text unlike any llama.cpp pre-tokenizer "
                           f"this export knows (orchard's, Llama 3's); convert with llama.cpp's convert_hf_to_gguf.py")

    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise OrchardError(f"{tokenizer_file}: token id {max(by_id)} does not fit the model's "
                           f"vocab_size {vocab_size}")
    added = backend.get_added_tokens_decoder()

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special
                         else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            tokens.append(token)

    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        # tokenizers >= 0.20 writes pairs; GGUF keeps the old "a b" strings (a space inside a part
        # becomes chr(0x20 + 256), as SpecialVocab does; byte-level tokens never contain one).
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    return pre, tokens, types, list(merges)


EXPORT_KEY = "orchard.export"
"""Metadata key recording which checkpoint a file was exported from (llama.cpp ignores it)."""


def _export_note(gguf_file: Path, gguf) -> dict | None:
    """The `orchard.export` note of a GGUF file orchard wrote, or None."""
    field = gguf.GGUFReader(gguf_file).fields.get(EXPORT_KEY)
    return json.loads(field.contents()) if field is not None else None


def export_gguf(checkpoint_dir: Path, out_file: Path, dtype: str = "f16", force: bool = False) -> Path:
    """Write the checkpoint at `checkpoint_dir` (or a run's latest) as a GGUF file at `out_file`,
    with 2-D weights in `dtype` ("f32", "f16" or "q8_0"); returns the path written. An adapter
    checkpoint is written with its LoRA (or DoRA) merged into the base, as the HF export does.

    The file is written beside `out_file` under a temporary name and renamed into place, so an
    interrupted export never leaves a truncated file behind. An existing `out_file` is replaced only
    when it is an earlier GGUF export of the same checkpoint (its `orchard.export` key says so), or
    with `force`.
    """
    if dtype not in DTYPES:
        raise OrchardError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    try:
        import gguf
    except ImportError:
        raise OrchardError("GGUF export needs the gguf package: pip install gguf") from None
    source = resolve_checkpoint(checkpoint_dir)
    out_file = Path(out_file)
    if out_file.is_dir():
        raise OrchardError(f"{out_file}: is a directory; give the GGUF file's name (e.g. model-{dtype}.gguf)")
    note = export_note(source, "gguf")
    check_output(out_file, "--out", "export",
                 owned=lambda target: same_export(_export_note(target, gguf), source, "gguf"),
                 inputs=loaded_paths(source), force=force)
    checkpoint = load_merged(source)
    model, tokenizer, config = checkpoint.model, checkpoint.tokenizer, checkpoint.model.config

    # llama.cpp runs these as other architectures (qwen3) or needs extra rope metadata; not written yet.
    if config.qk_norm:
        raise OrchardError(f"{checkpoint.path}: GGUF export of qwen3-style q/k norms is not supported yet")
    if config.rope_scaling:
        raise OrchardError(f"{checkpoint.path}: GGUF export with rope_scaling is not supported yet")
    head_dim = config.resolved_head_dim
    qwen2 = config.attention_bias
    if qwen2 and config.num_attention_heads * head_dim != config.hidden_size:
        raise OrchardError(f"{checkpoint.path}: llama.cpp's qwen2 architecture needs num_attention_heads * "
                           f"head_dim == hidden_size ({config.num_attention_heads} * {head_dim} != "
                           f"{config.hidden_size})")
    arch = gguf.MODEL_ARCH.QWEN2 if qwen2 else gguf.MODEL_ARCH.LLAMA
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    weight_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]

    pre, tokens, token_types, merges = _vocabulary(checkpoint.path / "tokenizer.json", config.vocab_size, gguf)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_file.parent, out_file.name)
    tmp = temporary_path(out_file)
    writer = gguf.GGUFWriter(tmp, arch_name)
    try:
        # --- hyperparameters (TextModel / LlamaModel.set_gguf_parameters) ---
        writer.add_name(_model_name(checkpoint.path))
        writer.add_string(EXPORT_KEY, json.dumps(note, sort_keys=True))
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_file_type(file_type)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # --- tokenizer (_set_vocab_gpt2 + SpecialVocab) ---
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.bos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_pad_token_id(tokenizer.pad_id)
        writer.add_add_bos_token(False)
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)

        # --- tensors (LlamaModel.modify_tensors + ModelBase.prepare_tensors) ---
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        for name, tensor in model_state_dict(model).items():
            new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise RuntimeError(f"no GGUF name for tensor {name}")
            data = tensor.detach().to("cpu").float().numpy()
            if not qwen2 and name.endswith("q_proj.weight"):
                data = permute_qk(data, config.num_attention_heads)
            elif not qwen2 and name.endswith("k_proj.weight"):
                data = permute_qk(data, config.num_key_value_heads)
            qtype = weight_type
            if data.ndim <= 1 or new_name.endswith("_norm.weight"):
                qtype = gguf.GGMLQuantizationType.F32
            try:
                data = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # rows not a multiple of the block size
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(new_name, data, raw_dtype=qtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file
