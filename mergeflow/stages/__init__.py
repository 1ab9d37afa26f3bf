"""The pipeline's stages as plain library calls on references (URI + sha256), one module per stage: `fetch`,
`data`, `finetune`, `statistics`, `sparsify`, `subspace`, `sweep`, `search`, `merge`, `evaluate` (and `runs`, what
a run leaves for the next). Each works over a `store.Store` (root, storage options with credentials, cache) built
once per caller, and lists its plan stages in `STAGES` (`stage.Stage`: where its output lands, how it runs); `refs`
holds the references, the fingerprints and the output locations. The planner (`mergeflow.plan`) reads every
module's `STAGES`; `plan_status` and `in_process` are two of a plan's readers, the flow (`flows/plan_run.py`) the
third. Nothing here knows about Prefect or MLflow. Every model family (`mergeflow.families`) is served: the family
travels with the pretrained model's reference (`refs.ModelRef`)."""
