"""The FineTuneJob controller: admission, then a ConfigMap, a headless Service and an Indexed Job that
run the trainer, and a status derived from the Job, its pods and rank 0's metrics."""
