"""DVC stage 'optimize': clawly/steps/optimize.py; with Hydra's -m, a sweep of whole jobs (clawly/sweep.py)."""

from clawly.steps import optimize
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("optimize", optimize.run, sweep="clawly.sweep")  # -m: clawly/sweep.py
