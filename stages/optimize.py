"""DVC stage 'optimize': see clawly.pipeline.optimize."""

from clawly.pipeline import optimize
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("optimize", optimize)
