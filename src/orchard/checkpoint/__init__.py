"""Checkpoint directories: what a trained model is on disk.

A checkpoint is a directory that Hugging Face tools can read as it is:

    config.json              the architecture (Hugging Face Llama/Qwen2/Qwen3 field names)
    model.safetensors        the weights (Hugging Face tensor names; a tied lm_head is omitted)
    tokenizer.json           the tokenizer, and tokenizer_config.json with its chat template
    generation_config.json   default sampling settings
    orchard.json             the lineage record: stage, parent, recipe, data, compute, metrics
    training_state.json      counters, optimizer settings and RNG of a resumable step checkpoint,
    training_state.safetensors   with the optimizer's tensors (no pickle: nothing read can run code)
    quantization.json        only in a quantized checkpoint (`orchard quantize`): which layers hold
                             int8/int4 codes in model.safetensors instead of a weight (see
                             `orchard.model.quantization`). Such a checkpoint is orchard's own, for
                             inference: transformers would load it with those layers missing.

Every write goes to a hidden temporary directory beside the target and is renamed into place
when complete, so a run killed at any moment leaves either the old checkpoint or the new one,
never half of one.

Loading reads Hugging Face model directories too (Llama, Qwen2, Qwen3, Mistral; weights in one
`model.safetensors` or in shards listed by `model.safetensors.index.json`), and Hub model ids, which
are downloaded into the Hugging Face cache. The weights are memory-mapped and become the model's
parameters without a copy, so loading a model costs little more memory than its weights.

Modules, lowest first: `layout` (where things are, reading small files), `adapters` (adapter
checkpoints), `training_state` (a step checkpoint's resumable state), `save`, `load`; and the
operations that derive a checkpoint from another, `grow` and `quantize` (imported by name, not here).
"""

from .adapters import adapter_tensors, attach_adapter_checkpoint, restore_adapters
from .layout import (ADAPTER_SETTINGS_FILE, ADAPTER_WEIGHTS_FILE, FINAL_DIR, LEGACY_TRAINING_STATE_FILE, PEFT_DIR,
                     QUANTIZATION_FILE, RECORD_FILE, STEP_PREFIX, TRAINING_STATE_FILE, TRAINING_TENSORS_FILE,
                     WEIGHTS_FILE, WEIGHTS_INDEX_FILE, has_training_state, inference_only_error, is_adapter_checkpoint,
                     is_checkpoint, is_quantized_checkpoint, loaded_paths, output_beside, read_model_config,
                     read_quantization, read_record, read_weights, resolve_checkpoint, step_checkpoints,
                     weights_files, weights_sha256)
from .load import (Checkpoint, check_tokenizer_matches, checked_weights, load_checkpoint, load_merged, load_weights,
                   restore_trained_weights)
from .save import model_state_dict, save_checkpoint
from .training_state import read_training_state, write_training_state

__all__ = ["ADAPTER_SETTINGS_FILE", "ADAPTER_WEIGHTS_FILE", "FINAL_DIR", "LEGACY_TRAINING_STATE_FILE", "PEFT_DIR",
           "QUANTIZATION_FILE", "RECORD_FILE", "STEP_PREFIX", "TRAINING_STATE_FILE", "TRAINING_TENSORS_FILE",
           "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "Checkpoint", "adapter_tensors", "attach_adapter_checkpoint",
           "check_tokenizer_matches", "checked_weights", "has_training_state", "inference_only_error",
           "is_adapter_checkpoint", "is_checkpoint", "is_quantized_checkpoint", "load_checkpoint", "load_merged",
           "load_weights", "loaded_paths", "model_state_dict", "output_beside", "read_model_config",
           "read_quantization", "read_record", "read_training_state", "read_weights", "resolve_checkpoint",
           "restore_adapters", "restore_trained_weights", "save_checkpoint", "step_checkpoints", "weights_files",
           "weights_sha256", "write_training_state"]
