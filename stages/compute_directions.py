"""DVC stage 'compute-directions': clawly/steps/compute_directions.py."""

from clawly.steps import compute_directions
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("compute-directions", compute_directions.run)
