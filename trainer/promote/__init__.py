"""The promotion stage: the retraining policy, the paired gate, the canary, the cycle (mnist-retrain) and the MLflow registry that follows the store."""
