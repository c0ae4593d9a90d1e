"""MLflow models-from-code entry: logged as the model's code, so nothing is pickled."""

from mlflow.models import set_model

from transferkit.serving import ClassifierModel

set_model(ClassifierModel())
