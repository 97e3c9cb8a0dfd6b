# %% [markdown]
# # clawly from Python: the whole job, step by step
#
# Run it as a script (`python examples/notebook.py [MODEL] [WORK_DIR]`) or cell by cell in
# Jupyter / VS Code. MODEL defaults to the packaged Qwen2.5-Coder-0.5B-Instruct; on a 2-core CPU
# this takes about ten minutes with the settings below.

# %%
import sys

from clawly import Pipeline, Settings

model = sys.argv[1] if len(sys.argv) > 1 else "default"
work = sys.argv[2] if len(sys.argv) > 2 else "notebook-output"
settings = Settings(
    model=model,
    artifacts_dir=f"{work}/work",
    n_trials=6,
    n_startup_trials=4,
    data={"out_dir": f"{work}/work/prompts", "train_per_category": 16, "eval_per_category": 12},
    probe={"max_per_category": 16},
    optimize={"harmful_prompts": 32, "harmless_prompts": 32, "batch_size": 32},
)
pipe = Pipeline(settings)

# %% The model and the prompt sets (id, text, category, split)
model, tokenizer = pipe.load_model()
harmful, harmless = pipe.load_datasets()
print(harmful.groupby(["category", "split"]).size().unstack())

# %% Refusal directions: [m, P, d] (m = 1 in global mode; P = layers + 1 probe points)
directions = pipe.compute_refusal_directions()
print(directions.mode, tuple(directions.directions.shape))

# %% How answers are scored: the shared response opening, and a batch size timed on this machine
print("response prefix:", repr(pipe.detect_response_prefix()))
print("batch size:", pipe.auto_batch_size())
search = pipe.start_search()
print(f"base model: {search.base_refusals}/{search.scored_prompts} refusals")

# %% The search, one result per trial (interrupt it and run the cell again: it resumes)
for trial in pipe.run_optimization_iter():
    print(trial, trial.refusals_by_category)

# %% The Pareto front (fewer refusals vs less damage), and the trial the rule picks
front = pipe.get_pareto_front()
for trial in front:
    print(trial)
chosen = pipe.choose_trial()
print("chosen:", chosen)

# %% Put a trial's weights into the model, try it, save it
pipe.restore_trial(chosen)
print(pipe.score())
pipe.save_adapter(f"{work}/adapter")
pipe.save_model(f"{work}/model")
print(f"saved {work}/adapter and {work}/model (each with clawly_reproduction.json)")
