"""DVC stage 'merge': clawly/steps/merge.py."""

from clawly.steps import merge
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("merge", merge.run)
