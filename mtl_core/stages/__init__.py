"""The stages of the pipeline, one module each: what `dvc.yaml`, the `mtl` CLI and the Prefect flow run
(through mtl_core.pipeline). A stage is a plain function of the validated configuration and the project
root that reads its inputs, calls the library code below it (data, training, evaluation, registry,
tracking) and writes files as its outputs; the training stages also describe their `fit`s as a plan
(`plan(cfg, paths)`: training.plan), which rank 0 and every DDP worker execute alike."""
