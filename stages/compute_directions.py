"""DVC stage 'compute-directions': see clawly.pipeline.compute_directions."""

from clawly.pipeline import compute_directions
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("compute-directions", compute_directions)
