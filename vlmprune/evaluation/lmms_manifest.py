"""The ``lmms_eval.models`` entry point: registers ``--model vlmprune`` (class in ``vlmprune.evaluation.lmms``).

Kept apart from the model class so that lmms-eval's registry can read it without importing JAX."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="vlmprune", simple_class_path="vlmprune.evaluation.lmms.VlmpruneLMM")
