"""The optimization: the Optuna study (`study`: storage, sampler, search space, objectives, the
choice rule, trials table, Pareto plot), the chosen trial's files (`chosen`) and extra worker
processes on one study (`workers`).

May import `clawly.ablate`, `clawly.measure`, `clawly.model`, `clawly.data` and the core modules.
"""
