"""The pipeline's stages as plain library calls on references (URI + sha256), one module per stage: `fetch`,
`data`, `finetune`, `statistics`, `sparsify`, `merge`, `sweep`, `evaluate` (and `runs`, what a run leaves for
the next). Each works over a `store.Store` (root, storage options with credentials, cache) that the
caller builds once per task; `refs` holds the references, the fingerprints
and every output location. Prefect tasks in `tasks/` wrap these one to one; nothing here knows about Prefect or
MLflow. Every model family (`mergeflow.families`) is served: the family travels with the pretrained model's
reference (`refs.ModelRef`)."""
