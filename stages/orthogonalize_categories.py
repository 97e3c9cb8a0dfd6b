"""DVC stage 'orthogonalize-categories': see clawly.pipeline.orthogonalize_categories."""

from clawly.pipeline import orthogonalize_categories
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("orthogonalize-categories", orthogonalize_categories)
