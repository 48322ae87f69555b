"""What the stages that run a network share: devices and parallelism, checkpoints, the data
each task trains on, metrics, the model on disk and the inference helpers the served model
carries. Imports torch and `model/`, never Prefect or MLflow.
"""
