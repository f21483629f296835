"""What MLflow runs to load a logged recommender (MLflow's "models from code": nothing is unpickled).

tracking.log_model logs this file with the model; mlflow.pyfunc.load_model runs it once the
model's copy of our layers (its code paths) is on sys.path. See jobs/serving.py.
"""

import mlflow

from interestformer.jobs.serving import RecommenderModel

mlflow.models.set_model(RecommenderModel())
