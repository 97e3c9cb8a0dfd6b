"""DVC stage 'orthogonalize-categories': clawly/steps/orthogonalize_categories.py."""

from clawly.steps import orthogonalize_categories
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("orthogonalize-categories", orthogonalize_categories.run)
