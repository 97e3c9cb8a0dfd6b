"""DVC stage 'merge': see clawly.pipeline.merge."""

from clawly.pipeline import merge
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("merge", merge)
