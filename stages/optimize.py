"""DVC stage 'optimize': clawly/steps/optimize.py."""

from clawly.steps import optimize
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("optimize", optimize.run)
