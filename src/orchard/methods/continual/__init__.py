"""Continual learning: one checkpoint trained through a sequence of tasks (conversations or text).

Run it with `orchard continual init=CKPT [RECIPE.yaml] [key=value ...]`; with no `tasks` it trains
on the built-in stream (`CONTINUAL_TASKS`: word problems, English facts, Chinese facts). Read top
to bottom, a run is:

1. every task's data: a built-in task (a name in `CONTINUAL_TASKS`) trains on its "train" split
   and is scored on `eval_items` items of its "held_out" split; a conversations task (a .jsonl,
   any format `orchard sft` reads) is shuffled (seeded) and its first `eval_items` conversations
   are held out, the rest train; both are tokenized as SFT does. A text task ("text:PATH" or a
   .txt file: continued pretraining) is tokenized into pretraining's token cache and cut into
   windows of data.max_length tokens; its last `eval_items` windows are held out, and it trains
   with pretraining's batches and loss. With eval_on=train every task is scored on its first
   `eval_items` training items instead (retention of what was taught);
2. the baseline: the init model scored on every task (cached in `out/baseline.json`);
3. for each task i, training with the shared engine into `out/task-<i>-<name>/`, a normal run
   directory (resumable; a finished one is skipped, so a killed run resumes where it stopped),
   with the strategy's changes:
   * naive: plain fine-tuning of the previous task's checkpoint;
   * replay: a reservoir (Algorithm R, seeded) of `replay_size` training examples of the earlier
     tasks (conversations, or text windows supervised on every token); each micro-batch is a
     replay micro-batch with probability `replay_ratio`, decided by a seeded draw from (step,
     micro-batch), so batches stay a pure function of the step and resume exactly;
   * ewc: online elastic weight consolidation. After task i the diagonal Fisher of the
     log-likelihood on `ewc_batches` of task i's batches (squared gradients of each batch's mean
     token loss, averaged) is added to the decayed earlier one, F = ewc_gamma * F_old + F_new, and
     saved as `task-<i>-<name>/fisher.safetensors` beside its final checkpoint; task i+1 then adds
     (ewc_lambda / 2) * sum F (theta - theta*)^2 to the mean token loss, theta* being task i's
     final weights. The Fisher is that of a batch's mean loss, so ewc_lambda keeps its meaning
     across batch sizes; its values are small, so useful lambdas are large (the default, 1e6, is
     the one measured on the built-in stream);
   * adapters: the base stays frozen; every task trains its own LoRA adapter (named after the
     task) from the base, and its checkpoint holds only that adapter. Task j is evaluated with
     adapter j active (task identity known at test time), so nothing learnt can be forgotten:
     R[i][j] == R[j][j] for j <= i; a task whose adapter is not trained yet (j > i) is scored on
     the base alone, so that row's later cells equal the baseline.
   Each task's `fit()` has its own warm-up and cosine decay: continual pre-training's re-warming
   and re-decay per task come for free.
4. after each task, every task scored on its scored items: row i of the accuracy matrix R
   (cached in `task-<i>-<name>/scores.json`);
5. `out/continual.json` (R, baseline, the `orchard.evaluation.transfer_matrix` summary, task names,
   strategy, each task's metric), `out/R.png` (heat map) and `out/report.md` (tables).

Scores: built-in tasks are scored by greedy exact match (`chat_exact_match` with each item's
expected answer). Conversation files have no expected answers, so they are scored by the held-out
likelihood exp(-mean token loss) on the assistant tokens of their held-out conversations, and text
tasks by the likelihood per byte, 2 ** -(bits per byte) of the held-out windows. Every score is in
[0, 1] and higher is better, so the R-matrix metrics (forgetting, transfer) keep their meaning for
every task; continual.json names each task's metric and also gives the matrix in each task's own
unit ("values": bits per byte for text), which the table and heat map show.

Runs in one process (not under torchrun: the engine closes its process group at the end of each
`fit()`).
"""

from .config import ContinualConfig, ContinualDataConfig
from .pipeline import run
from .scoring import mean_likelihood, score_task
from .strategies import ContinualLanguageModeling, EWCPenalty, diagonal_fisher, reservoir
from .tasks import Task, conversation_modeling, load_task

__all__ = ["ContinualConfig", "ContinualDataConfig", "ContinualLanguageModeling", "EWCPenalty", "Task",
           "conversation_modeling", "diagonal_fisher", "load_task", "mean_likelihood", "reservoir", "run",
           "score_task"]
