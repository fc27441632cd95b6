"""Losses: pure functions of tensors, on the ground floor so that data, evaluation and every method
can use them (they import nothing of orchard).

- `tokens`: next-token cross-entropy, per-token log-probabilities, bits per byte, `IGNORE_INDEX`;
- `preference`: DPO, IPO, SimPO and ORPO;
- `rl`: group advantages, GAE, clipped surrogates, KL estimators, loss aggregation (GRPO, PPO);
- `distillation`: forward/reverse KL, generalised JSD, sparse top-k teachers, hidden-state alignment.
"""
