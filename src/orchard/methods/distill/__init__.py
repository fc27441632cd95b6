"""Knowledge distillation: a small student learns from a large teacher's distributions.

Run it with `orchard distill TEACHER --student CONFIG_OR_CKPT [RECIPE.yaml] [key=value ...]`; with
no data it distils on the built-in world's documents. Read top to bottom, a run is:

1. the teacher (a checkpoint) and its tokenizer, which the student must share;
2. the student: a checkpoint to continue, a fresh model from a config file (a YAML of model
   fields), or `student_layers=[...]`, a fresh model made of some of the teacher's layers with its
   embeddings and final norm (as DistilBERT starts from every other layer of BERT);
3. the data: a text corpus cut into packed windows, exactly as pretraining reads it (`data.*`);
4. by `mode`, the teacher's side of the loss:
   - offline: the teacher runs once over the data and its top-k log-probabilities are stored
     beside the tokenized corpus (`teacher_cache`); every later student with the same teacher,
     data and k trains from that file without loading the teacher;
   - online: the teacher sits beside the student and scores each batch, with all its logits
     (and hidden states, for `hidden_weight`);
   - on_policy: as online, but a `lmbda` fraction of the batches are the student's own
     continuations of the windows' first `prompt_tokens` tokens, scored by the teacher (GKD);
   - sequence: the teacher answers the prompts (`prompts.*`), and the student is fine-tuned on
     those answers as on conversations (sequence-level KD, Kim & Rush 2016);
5. the shared engine, with the loss of `orchard.losses.distillation`: `alpha` x the divergence (forward KL,
   reverse KL or generalised JSD at `temperature`) + (1 - alpha) x the data's cross-entropy, plus
   `hidden_weight` x the projected hidden-state error; validated by the student's loss and bits per
   byte and by all three divergences from the teacher on held-out windows, side by side.
"""

from .cache import TeacherCache, build_teacher_cache, cache_directory, open_teacher_cache
from .config import CACHE_PREFIX, REPLIES_FILE, DistillConfig
from .method import Distillation
from .models import Teacher, build_student, parameter_summary, quarter_width_config, write_student_config
from .pipeline import run

__all__ = ["CACHE_PREFIX", "REPLIES_FILE", "DistillConfig", "Distillation", "Teacher", "TeacherCache",
           "build_student", "build_teacher_cache", "cache_directory", "open_teacher_cache", "parameter_summary",
           "quarter_width_config", "run", "write_student_config"]
