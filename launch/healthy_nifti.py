"""--healthy_nifti of launch.synthesize_local: the institute's volumes -> its healthy split.

Kept apart from the binary (no flags here), so that tests and the pipeline
can call it without defining the binary's flags twice.
"""

import os

HEALTHY_SLICES = "healthy_slices"  # under W2/private: the volumes' healthy split.


def healthy_from_volumes(config, model_dir: str, workdir: str, nifti_dir: str, *,
                         overwrite: bool = False, progress: bool = True) -> str:
  """W2/private/healthy_slices preprocessed from the institute's volumes; its folder.

  The data config is --config's with G2's image size and modalities (its
  export's), so the slices are what G2 was trained on.

  Raises:
    model_io.ModelError: model_dir is not an export (before any volume is read).
    errors.UserError: a bad volume or config, or slices of other volumes
      there (without overwrite); see healthy_volumes.run.
  """
  from data_pipeline import healthy_volumes  # pylint: disable=g-import-not-at-top
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  if not model_io.is_export(model_dir):
    raise model_io.ModelError(
        f"{model_dir}: not an exported model ({model_io.MODEL_JSON}); local "
        "synthesis runs only G2's export (launch.train_g2 --out)")
  saved = model_io.read_record(model_dir)["config"]["data"]
  cfg = {**config.data.to_dict(), "image_size": saved["image_size"],
         "modalities": tuple(saved["modalities"])}
  out = os.path.join(stage.layout(workdir)["private"], HEALTHY_SLICES)
  healthy_volumes.run(nifti_dir, out, cfg, overwrite=overwrite, progress=progress)
  return out
