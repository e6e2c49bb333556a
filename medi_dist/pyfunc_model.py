"""The MLflow pyfunc of a medi-dist model directory (logged as "models from code": MLflow stores this
file, not a pickle). `mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(df)` generates one tile
per row of conditions:

    df columns: cancer_type, tissue_source_site, ... (the model's conditions), optional `seed`
    params:     sampler (dpmsolver++), steps (25), guidance (1.0), guidance_lo / guidance_hi (0, 1: guided
                at diffusion times t/T in [lo, hi], as `medi-dist generate --guidance-interval`), weights (ema)
    returns:    the conditions, seed and `png` (the tile as PNG bytes)

The model directory is an artifact of the MLflow model (artifacts/model_dir); loading it checks its
checksums like every other loader.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

MODEL_DIR_ARTIFACT = "model_dir"  # key in the pyfunc's artifacts: artifacts/<model dir name>
DEFAULT_PARAMS = {
    "sampler": "dpmsolver++",
    "steps": 25,
    "guidance": 1.0,
    "guidance_lo": 0.0,
    "guidance_hi": 1.0,
    "weights": "auto",
}


def signature(spec):
    """Inputs: the model's conditions and an optional seed; params: the sampling settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [ColSpec("string", c) for c in spec.categorical_names]
        + [ColSpec("double", c, required=False) for c in spec.continuous_names]
        + [ColSpec("long", "seed", required=False)]
    )
    kinds = {str: "string", int: "long", float: "double"}
    return ModelSignature(
        inputs=inputs,
        outputs=Schema([ColSpec("binary", "png")]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in DEFAULT_PARAMS.items()]),
    )


class MeDiTileGenerator(PythonModel):
    def load_context(self, context) -> None:
        self.path = context.artifacts[MODEL_DIR_ARTIFACT]
        self.model = None  # loaded at the first predict, with the weights it asks for

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from PIL import Image

        from medi_dist.model import encode_conditions, load_model_dir, sample  # absolute: MLflow runs this file
        from medi_dist.model.sampling import check_interval
        from medi_dist.visual import png_bytes  # as a module of its own

        p = {**DEFAULT_PARAMS, **(params or {})}
        interval = check_interval((p["guidance_lo"], p["guidance_hi"]))  # before loading the weights
        if self.model is None or self.model.weights_kind != p["weights"]:
            self.model, _, self.spec = load_model_dir(self.path, p["weights"])
        df = model_input.reset_index(drop=True)
        seeds = df["seed"].astype(int).tolist() if "seed" in df else list(range(len(df)))
        rows = [{k: v for k, v in r.items() if k != "seed"} for r in df.to_dict("records")]
        cond = encode_conditions(self.spec, rows, strict=True)
        tiles = sample(
            self.model,
            cond,
            seeds=seeds,
            sampler=p["sampler"],
            steps=int(p["steps"]),
            guidance_scale=float(p["guidance"]),
            guidance_interval=interval,
        )
        return df.assign(seed=seeds, png=[png_bytes(Image.fromarray(t)) for t in tiles])


mlflow.models.set_model(MeDiTileGenerator())
