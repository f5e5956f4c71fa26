"""MLflow: the tracking store (`store`), the runs of the models and their tags (`runs`), and what the
MLflow UI shows of them (`views`)."""
